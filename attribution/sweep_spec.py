"""Sweep files: the YAML ``wandb sweep`` takes, read, checked and expanded into runs (grid or
random).  Every parameter must name a config key and every run's config must load, before the
first run starts."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from pathlib import Path

from attribution.config import ConfigError, load_config, read_yaml_file


def load_sweep(path: str | Path, check_runs_too: bool = True) -> dict:
    """Read and check a sweep file's form (every parameter must name a config key) and, unless
    ``check_runs_too`` is false (a figure of finished rows), every run's config."""
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
    if check_runs_too:  # every key names a field, every value is valid
        check_runs(sweep, expand(sweep), [], path)
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
    return ",".join(_dotlist(params))


# the commas that separate a run id's settings: those before the next "key=" (a value may be a
# list, whose own commas are followed by a space and a value, not by a key)
_RUN_ID_SPLIT = re.compile(r",(?=[A-Za-z_][\w.]*=)")


def run_dotlist(run_id: str) -> list[str]:
    """The ``key=value`` overrides a run id was made from (the inverse of :func:`_run_id`)."""
    return _RUN_ID_SPLIT.split(run_id)


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


def ap_file(table_dir: str | Path, experiment: str, run_id: str) -> Path:
    """Where a sweep run's per-test-query AP arrays live (``<table dir>/ap/<digest>.npz``), so
    the claims compare two runs query by query (a paired standard error)."""
    digest = hashlib.sha256(f"{experiment}\n{run_id}".encode()).hexdigest()[:16]
    return Path(table_dir) / "ap" / f"{digest}.npz"
