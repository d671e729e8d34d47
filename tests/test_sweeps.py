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
    assert {r["experiment"] for r in rows} == {smoke_run.cfg.name}
    # each run's per-query AP (for the claims' paired differences), consistent with its row
    from attribution.common.files import load_npz
    from attribution.sweep_spec import ap_file

    for r in rows:
        ap = load_npz(ap_file(table.parent, r["experiment"], r["run"]))["student@5"]
        assert ap.mean() == pytest.approx(float(r["student.mAP@5"]))
    assert all(0 <= float(r["student.mAP@5"]) <= 1 for r in rows)
    again = []
    run_sweep(sweep, output_root=str(smoke_run.cfg.output_root), echo=again.append)
    assert all("skip" in ln for ln in again) and len(again) == 2
    # a row of another experiment (the sweep file's command changed) does not count as done
    with open(table) as f:
        text = f.read()
    table.write_text(text.replace(f",{smoke_run.cfg.name},", ",other_experiment,", 1))
    third = []
    run_sweep(sweep, output_root=str(smoke_run.cfg.output_root), echo=third.append)
    assert sum("skip" in ln for ln in third) == 1 and len(third) == 2
    # nor is a row whose resolved config has changed since (a world, teacher or default): the
    # run reruns and its row is replaced, not repeated
    with open(table) as f:
        mine = [r for r in csv.DictReader(f) if r["experiment"] == smoke_run.cfg.name]
    assert len(mine) == 2 and len({r["config"] for r in mine}) == 2
    table.write_text(table.read_text().replace(mine[0]["config"], "0123456789ab", 1))
    fourth = []
    run_sweep(sweep, output_root=str(smoke_run.cfg.output_root), echo=fourth.append)
    assert sum("skip" in ln for ln in fourth) == 1 and len(fourth) == 2
    with open(table) as f:
        now = [r for r in csv.DictReader(f) if r["experiment"] == smoke_run.cfg.name]
    assert sorted(r["config"] for r in now) == sorted(r["config"] for r in mine)
    # the figure of this sweep, drawn from its table by the `figures` command
    from attribution.cli import main

    out = tmp_path / "figs"
    assert main(["figures", "--sweeps", str(tmp_path), "--results", str(table.parent.parent),
                 "--out", str(out)]) == 0
    png = out / "two.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_seeds_add_a_student_seed_axis(smoke_run, tmp_path):
    sweep = tmp_path / "seeded.yaml"
    # no validation: the last epoch is reported (validation may keep the identity head's epoch
    # 0, which no seed changes)
    sweep.write_text("method: grid\nmetric: {name: student.mAP@5, goal: maximize}\n"
                     "parameters:\n  student.p_outside: {values: [0.0]}\n"
                     "  student.val_queries: {value: 0}\n"
                     f"command: [attribution, run, {SMOKE}, '${{args_no_hyphens}}']\n")
    table = run_sweep(sweep, output_root=str(smoke_run.cfg.output_root), echo=lambda s: None,
                      seeds=[1, 2])
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [r["student.seed"] for r in rows] == ["1", "2"]
    # different seeds train different heads: their figures differ (else s.e. over seeds = 0)
    assert rows[0]["student.mAP@5"] != rows[1]["student.mAP@5"] or \
        rows[0]["student.mAP@10"] != rows[1]["student.mAP@10"]
