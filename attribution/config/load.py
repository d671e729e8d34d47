"""The layered loader: schema defaults <- experiment file(s) <- CLI dotlist; saving and hashing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attribution.common.plain import to_dict
from attribution.config.rules import ConfigError
from attribution.config.schema import ADDED_LATER, Config
from attribution.config.validate import _check_keys, _validate


def read_yaml_file(path: Path, what: str = "config file") -> Any:
    """A YAML file's content (unresolved); a missing or unparsable file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what[0].upper()}{what[1:]} not found: {path}")
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # yaml syntax errors come in several types
        first = str(err).strip().splitlines()
        raise ConfigError(f"Could not parse {what} {path}: "
                          f"{first[0] if first else type(err).__name__}") from err


def _read_yaml(path: Path) -> dict:
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"Config file {path}: _base_ must be a file name, got {base!r}")
    parent = _read_yaml((path.parent / base).resolve())
    return OmegaConf.to_container(OmegaConf.merge(parent, data))


def _merge(schema: DictConfig, data: dict, source: str) -> DictConfig:
    _check_keys(schema, data, "", source)
    try:
        return OmegaConf.merge(schema, data)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(err).split("\n")[0]
        raise ConfigError(f"Bad value for config key '{key}' (from {source}): {msg}") from err


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the resolved config: schema defaults <- experiment file <- ``key=value`` overrides.

    Args:
        path: an experiment YAML (a delta over the defaults), or None for pure defaults.
        overrides: dotlist strings such as ``["generator.train.steps=10", "seed=3"]``.

    Returns:
        A validated, read-only :class:`Config` (an OmegaConf structured config).
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
        if bad:
            raise ConfigError(f"Overrides must look like key=value, got: {bad}")
        try:
            dot = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"Could not parse overrides {overrides}: "
                              f"{str(err).splitlines()[0]}") from err
        cfg = _merge(cfg, dot, "command line")
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


def derive(cfg: Config, changes: dict) -> Config:
    """A copy of a loaded config with nested ``changes`` merged in (e.g.
    ``{"teacher": {"fisher": "diagonal"}}``), checked and validated like a file or override."""
    out = _merge(OmegaConf.structured(Config), to_dict(cfg), "a loaded config")
    out = _merge(out, changes, "derived settings")
    _validate(out)
    OmegaConf.set_readonly(out, True)
    return out  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (and upstream hashes) that key a stage's cache."""
    blob = json.dumps([to_dict(p) if OmegaConf.is_config(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_hash(cfg: Any) -> str:
    """The hash a sweep row records of the whole configuration it ran under (the report
    recomputes it to find stale rows): every key of ``ADDED_LATER`` at its "as before" value is
    left out, so adding a key to the schema does not make every finished row look as if it had
    run under another configuration."""
    d = to_dict(cfg)
    for section in ADDED_LATER:
        if isinstance(d.get(section), dict):
            d[section] = without_added_later(section, d[section])
    return config_hash(d)


def without_added_later(section: str, values: Any) -> dict:
    """The config section ``section`` (its node or dict) as a plain dict, less its
    ``ADDED_LATER`` keys that hold their "as before" value — what stage keys and sweep rows'
    hashes are taken of, so runs cached before a key existed stay valid."""
    keys = ADDED_LATER.get(section, {})
    return {k: v for k, v in to_dict(values).items() if not (k in keys and v == keys[k])}
