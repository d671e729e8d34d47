"""Run a W&B sweep file locally: the same YAML ``wandb sweep`` takes, expanded here (grid or
random) and run in-process through the pipeline, so only the stages a parameter touches rerun.

Each finished run appends a row (the experiment's name, the hash of its resolved config, the
parameters and the run's metrics) to ``runs/sweeps/<sweep>/results.csv`` and is skipped on
rerun.  A row whose experiment or config hash differs from the run's (another experiment, or a
world, teacher or default changed since) is not done: the run reruns and its row, and its
per-query AP file, are replaced.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from attribution.common.files import DataFileError, FolderLock, atomic_save_npz
from attribution.config import load_config, run_hash
from attribution.evaluation import per_query_ap
from attribution.pipeline import Pipeline
from attribution.sweep_spec import (
    _dotlist,
    _fmt,
    _run_id,
    ap_file,
    check_runs,
    expand,
    load_sweep,
)

__all__ = ["load_sweep", "expand", "check_runs", "run_sweep"]


def run_sweep(path: str | Path, extra: list[str] | None = None, output_root: str | None = None,
              progress: bool = False, echo=print, seeds: list[int] | None = None,
              rebuild: bool = False, experiment: str | None = None) -> Path:
    """Run every not-yet-finished run of a sweep; return the results CSV.

    ``seeds`` adds ``student.seed`` as one more grid axis (only the student reruns per seed);
    ``rebuild``: run in an experiment folder an older version made (``Pipeline.check_format``);
    ``experiment``: an experiment file in place of the one the sweep's command names (the same
    sweep on another recipe, e.g. this project's student instead of the paper's)."""
    sweep = load_sweep(path)
    if experiment is not None:
        sweep["config"] = str(experiment)
    if seeds:
        sweep["parameters"] = {**sweep["parameters"], "student.seed": {"values": list(seeds)}}
    overrides = list(extra or []) + ([f"output_root={output_root}"] if output_root else [])
    base = load_config(sweep["config"], overrides)
    runs = expand(sweep)
    check_runs(sweep, runs, overrides, path)
    out = Path(base.output_root) / "sweeps" / Path(path).stem
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):  # one sweep at a time writes this sweep's table
        return _run_sweep_runs(sweep, runs, overrides, out, progress, echo, rebuild)


def _run_sweep_runs(sweep: dict, runs: list[dict], overrides: list[str], out: Path,
                    progress: bool, echo, rebuild: bool) -> Path:
    table = out / "results.csv"
    done = set()
    if table.is_file():
        with open(table) as f:  # (run, experiment, config hash) of every finished row
            done = {(row["run"], row.get("experiment"), row.get("config"))
                    for row in csv.DictReader(f)}
    for params in runs:
        run_id = _run_id(params)
        cfg = load_config(sweep["config"], overrides + _dotlist(params))
        key = run_hash(cfg)
        pipe = Pipeline(cfg, progress=progress, echo=lambda s: None, rebuild=rebuild)
        if (run_id, cfg.name, key) in done:
            echo(f"[sweep] skip (done) {run_id}")
            _save_ap(pipe, out, run_id, echo)  # a row finished before these files existed
            continue
        with pipe.lock():  # the metrics read are this run's, not another process's
            pipe.run()  # runs every stage, so it also writes runs/<name>/metrics.json
            _save_ap(pipe, out, run_id, echo, replace=True)
            metrics = json.loads((pipe.root / "metrics.json").read_text())
        row = {"run": run_id, "experiment": cfg.name, "config": key,
               **{k: _fmt(v) for k, v in params.items()}, **metrics}
        echo(f"[sweep] {run_id}: {sweep['metric']['name']}="
             f"{metrics.get(sweep['metric']['name'], float('nan')):.4f}")
        _append(table, row)
    return table


def _save_ap(pipe: Pipeline, out: Path, run_id: str, echo, replace: bool = False) -> None:
    """The run's per-test-query AP (student and its untuned features), unless already saved
    (``replace``: a run just finished, so a file there is an older run's) or the run has no
    teacher test rankings (released data: test queries are K-set only)."""
    path = ap_file(out, pipe.cfg.name, run_id)
    if (path.is_file() and not replace) or pipe.released:
        return
    try:
        arrays = per_query_ap(pipe.cfg, pipe.dirs())
    except (DataFileError, OSError) as err:  # its folders were deleted since: no paired s.e.
        echo(f"[sweep] {run_id}: no per-query AP ({err})")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(path, **arrays)


def _append(table: Path, row: dict) -> None:
    rows = []
    if table.is_file():
        with open(table) as f:  # an older row of the same run and experiment is replaced
            rows = [r for r in csv.DictReader(f)
                    if (r["run"], r.get("experiment")) != (row["run"], row["experiment"])]
    rows.append({k: str(v) for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = table.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(table)
