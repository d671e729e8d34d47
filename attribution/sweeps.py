"""Run a W&B sweep file locally: the same YAML ``wandb sweep`` takes, expanded here (grid or
random) and run in-process through the pipeline, so only the stages a parameter touches rerun.

Each finished run appends a row (parameters + run metrics) to ``runs/sweeps/<sweep>/results.csv``
and is skipped on rerun.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from pathlib import Path

from omegaconf import OmegaConf

from attribution.config import ConfigError, load_config


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Sweep file not found: {path}")
    sweep = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for key in ("method", "parameters", "command", "metric"):
        if key not in sweep:
            raise ConfigError(f"sweep {path} has no '{key}'")
    if sweep["method"] not in ("grid", "random"):
        raise ConfigError(f"sweep {path}: method must be grid or random (local runner)")
    cmd = [str(c) for c in sweep["command"]]
    if "run" not in cmd or cmd.index("run") + 1 >= len(cmd):
        raise ConfigError(f"sweep {path}: command must contain 'run CONFIG'")
    sweep["config"] = cmd[cmd.index("run") + 1]
    for name, spec in sweep["parameters"].items():  # every key must exist in the schema
        load_config(sweep["config"], [f"{name}={_fmt(_values(spec)[0])}"])
    return sweep


def _values(spec: dict) -> list:
    """A W&B parameter's candidate values (``values: [...]`` or a fixed ``value:``)."""
    return spec.get("values", [spec.get("value")])


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, list) else str(v)


def expand(sweep: dict, n_random: int = 8, seed: int = 0) -> list[dict]:
    """Parameter dicts of every run (grid: the product; random: ``n_random`` draws)."""
    names = list(sweep["parameters"])
    choices = [_values(sweep["parameters"][n]) for n in names]
    if sweep["method"] == "grid":
        return [dict(zip(names, combo)) for combo in itertools.product(*choices)]
    rng = random.Random(seed)
    return [{n: rng.choice(c) for n, c in zip(names, choices)} for _ in range(n_random)]


def run_sweep(path: str | Path, extra: list[str] | None = None, output_root: str | None = None,
              progress: bool = False, echo=print, seeds: list[int] | None = None) -> Path:
    """Run every not-yet-finished run of a sweep; return the results CSV.

    ``seeds`` adds ``student.seed`` as one more grid axis (only the student reruns per seed)."""
    from attribution.pipeline import Pipeline

    sweep = load_sweep(path)
    if seeds:
        sweep["parameters"] = {**sweep["parameters"], "student.seed": {"values": list(seeds)}}
    overrides = list(extra or []) + ([f"output_root={output_root}"] if output_root else [])
    base = load_config(sweep["config"], overrides)
    out = Path(base.output_root) / "sweeps" / Path(path).stem
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.csv"
    done = set()
    if table.is_file():
        with open(table) as f:
            done = {row["run"] for row in csv.DictReader(f)}
    for params in expand(sweep):
        run_id = ",".join(f"{k}={_fmt(v)}" for k, v in params.items())
        if run_id in done:
            echo(f"[sweep] skip (done) {run_id}")
            continue
        cfg = load_config(sweep["config"], overrides + [f"{k}={_fmt(v)}" for k, v in params.items()])
        pipe = Pipeline(cfg, progress=progress, echo=lambda s: None)
        pipe.run()  # runs every stage, so it also writes runs/<name>/metrics.json
        metrics = json.loads((pipe.root / "metrics.json").read_text())
        row = {"run": run_id, **{k: _fmt(v) for k, v in params.items()}, **metrics}
        echo(f"[sweep] {run_id}: {sweep['metric']['name']}="
             f"{metrics.get(sweep['metric']['name'], float('nan')):.4f}")
        _append(table, row)
    return table


def _append(table: Path, row: dict) -> None:
    rows = []
    if table.is_file():
        with open(table) as f:
            rows = list(csv.DictReader(f))
    rows.append({k: str(v) for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = table.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(table)
