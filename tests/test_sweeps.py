import csv

import pytest

from attribution.config import ConfigError
from attribution.sweeps import expand, load_sweep, run_sweep
from tests.conftest import ROOT, SMOKE

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_parses_and_names_config_keys(path):
    sweep = load_sweep(path)
    assert "${args_no_hyphens}" in sweep["command"]
    assert len(expand(sweep)) >= 2


def test_unknown_sweep_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nmetric: {name: student.mAP@10, goal: maximize}\n"
                   "parameters:\n  student.losss: {values: [ce, mse]}\n"
                   f"command: [attribution, run, {SMOKE}, '${{args_no_hyphens}}']\n")
    with pytest.raises(ConfigError, match="student.losss.*student.loss"):
        load_sweep(bad)


def test_two_run_local_sweep_on_smoke(smoke_run, tmp_path):
    sweep = tmp_path / "two.yaml"
    sweep.write_text("method: grid\nmetric: {name: student.mAP@5, goal: maximize}\n"
                     "parameters:\n  student.loss: {values: [ce, listwise]}\n"
                     f"command: [attribution, run, {SMOKE}, '${{args_no_hyphens}}']\n")
    lines = []
    table = run_sweep(sweep, output_root=str(smoke_run.cfg.output_root), echo=lines.append)
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [r["student.loss"] for r in rows] == ["ce", "listwise"]
    assert all(0 <= float(r["student.mAP@5"]) <= 1 for r in rows)
    again = []
    run_sweep(sweep, output_root=str(smoke_run.cfg.output_root), echo=again.append)
    assert all("skip" in ln for ln in again) and len(again) == 2
