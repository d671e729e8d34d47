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
from attribution.config.schema import FORMAT_VERSION, Config
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


PRESETS = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    """The named recipes (``attribution/config/presets/<name>.yaml``) a ``_base_`` may name as
    ``preset:<name>``."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"No preset {name!r}; presets are {preset_names()}")
    return path


def read_preset(name: str) -> dict:
    """A preset's settings (its own ``_base_`` chain resolved), as a nested dict."""
    return _read_yaml(preset_path(name))


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """An experiment file as a dict, its ``_base_`` resolved: one file or a list of them
    (relative to this file, or ``preset:<name>``), merged in order, this file last.  A file
    with no keys (empty, or comments only) is an error: a run from it would silently be the
    defaults' run."""
    path = Path(path).resolve()
    if path in chain:
        raise ConfigError(f"Config file {path} is its own _base_ (through "
                          f"{' -> '.join(p.name for p in chain)})")
    data = read_yaml_file(path)
    if data is None or data == {}:
        raise ConfigError(f"No keys in config file {path}: it is empty or holds only "
                          "comments (a run from it would be the defaults' run; give at least "
                          "its name)")
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged = OmegaConf.create({})
    for b in bases:
        if not isinstance(b, str) or not b.strip():
            raise ConfigError(f"Config file {path}: _base_ must be a file name, 'preset:NAME' "
                              f"or a list of them, got {base!r}")
        target = (preset_path(b[len("preset:"):]) if b.startswith("preset:")
                  else path.parent / b)
        merged = OmegaConf.merge(merged, _read_yaml(target, (*chain, path)))
    return OmegaConf.to_container(OmegaConf.merge(merged, data))


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
        dot = {}
        for o in overrides:  # one at a time, so an error names the override
            try:
                one = OmegaConf.to_container(OmegaConf.from_dotlist([o]))
            except Exception as err:  # yaml's parser errors are not OmegaConf's
                first = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
                raise ConfigError(f"Could not parse the override {o!r}: "
                                  f"{first[0] if first else type(err).__name__}") from None
            dot = OmegaConf.to_container(OmegaConf.merge(dot, one))
        cfg = _merge(cfg, dot, "command line")
    _resolve(cfg)
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    if cfg.second_teacher.enabled:  # its preset and keys are checked now, not after hours
        second_teacher_config(cfg)
    return cfg  # type: ignore[return-value]


def _resolve(cfg: DictConfig) -> None:
    """Resolve every ${...} interpolation now, so a broken one (a missing key, a key that
    refers to itself) is one ConfigError naming the key instead of a traceback mid-run."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"Config key '{key}' does not resolve: "
                          f"{str(err).splitlines()[0]}") from None


def second_teacher_config(cfg: Config) -> Config:
    """The run's config with the second teacher's settings as its ``teacher`` section: the
    preset (``second_teacher.preset``) over the run's teacher, then ``second_teacher.teacher``
    (attribution/teacher/second.py)."""
    st = cfg.second_teacher
    changes: dict = {}
    if st.preset:
        preset = read_preset(st.preset)
        other = sorted(set(preset) - {"teacher"})
        if other:
            raise ConfigError(f"second_teacher.preset={st.preset} sets {other}, not only the "
                              "teacher: a second teacher changes the teacher alone")
        changes = dict(preset.get("teacher", {}))
    changes.update(to_dict(st.teacher))
    try:
        return derive(cfg, {"teacher": changes, "second_teacher": {"enabled": False}})
    except ConfigError as err:
        raise ConfigError(f"second_teacher: {err}") from None


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


# Settings added after this format's first sweep rows, left out of a run's hash at the value
# that behaves as before they existed: a row run before them is not stale for their arrival.
ADDED_NEUTRAL = {("teacher", "fisher_precision"): "fp32"}


def run_hash(cfg: Any) -> str:
    """The hash a sweep row records of the whole configuration it ran under, with the format
    version (the report recomputes it to find stale rows)."""
    d = to_dict(cfg)
    for (section, key), neutral in ADDED_NEUTRAL.items():
        if d.get(section, {}).get(key, neutral) == neutral:
            d.get(section, {}).pop(key, None)
    return config_hash(FORMAT_VERSION, d)
