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

from attribution.config import ConfigError, load_config, read_yaml_file


def load_sweep(path: str | Path) -> dict:
    """Read and check a sweep file's form (every parameter must name a config key)."""
    path = Path(path)
    sweep = read_yaml_file(path, "sweep file")
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep {path} must hold a mapping (method, parameters, command, "
                          f"metric)")
    for key in ("method", "parameters", "command", "metric"):
        if key not in sweep:
            raise ConfigError(f"sweep {path} has no '{key}'")
    if sweep["method"] not in ("grid", "random"):
        raise ConfigError(f"sweep {path}: method must be grid or random (local runner)")
    if not isinstance(sweep["metric"], dict) or "name" not in sweep["metric"]:
        raise ConfigError(f"sweep {path}: metric must be a mapping with a 'name'")
    if not isinstance(sweep["command"], list):
        raise ConfigError(f"sweep {path}: command must be a list (W&B's form)")
    cmd = [str(c) for c in sweep["command"]]
    if "run" not in cmd or cmd.index("run") + 1 >= len(cmd):
        raise ConfigError(f"sweep {path}: command must contain 'run CONFIG'")
    sweep["config"] = cmd[cmd.index("run") + 1]
    params = sweep["parameters"]
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"sweep {path}: parameters must be a non-empty mapping")
    for name, spec in params.items():
        if not isinstance(spec, dict) or not ("values" in spec or "value" in spec):
            raise ConfigError(f"sweep {path}: parameter '{name}' needs 'values: [...]' or "
                              f"'value: ...' (the local runner expands only these)")
        if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            raise ConfigError(f"sweep {path}: parameter '{name}' values must be a non-empty list")
    check_runs(sweep, expand(sweep), [], path)  # every key names a field, every value is valid
    return sweep


def check_runs(sweep: dict, runs: list[dict], overrides: list[str], path: str | Path) -> None:
    """Load the config of EVERY run before the first one starts: a bad value of any parameter
    (or a bad combination) fails now, not after hours of finished runs."""
    for params in runs:
        try:
            load_config(sweep["config"], overrides + _dotlist(params))
        except ConfigError as err:
            raise ConfigError(f"sweep {path}: run {_run_id(params)} is invalid: {err}") from None


def _values(spec: dict) -> list:
    """A W&B parameter's candidate values (``values: [...]`` or a fixed ``value:``)."""
    return spec["values"] if "values" in spec else [spec["value"]]


def _dotlist(params: dict) -> list[str]:
    return [f"{k}={_fmt(v)}" for k, v in params.items()]


def _run_id(params: dict) -> str:
    return ",".join(f"{k}={_fmt(v)}" for k, v in params.items())


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
    runs = expand(sweep)
    check_runs(sweep, runs, overrides, path)
    out = Path(base.output_root) / "sweeps" / Path(path).stem
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.csv"
    done = set()
    if table.is_file():
        with open(table) as f:
            done = {row["run"] for row in csv.DictReader(f)}
    for params in runs:
        run_id = _run_id(params)
        if run_id in done:
            echo(f"[sweep] skip (done) {run_id}")
            continue
        cfg = load_config(sweep["config"], overrides + _dotlist(params))
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
