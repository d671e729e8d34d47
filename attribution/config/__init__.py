"""Config schemas and the layered loader: schema defaults <- experiment file(s) <- CLI dotlist.

Every experiment file is a *delta* over the schema defaults (``schema.py``).  A file may name a
parent with ``_base_: other.yaml`` (resolved relative to the file), so ``toy_smoke.yaml`` only
says what it shrinks.  Unknown keys and wrong types fail with a :class:`ConfigError` that names
the key and suggests close matches (``rules.py``); rules relating fields are ``validate.py``; the
loader, saving and hashing are ``load.py``.  The resolved config is saved next to every stage's
outputs.
"""

from attribution.common.plain import to_dict
from attribution.config.load import (
    config_hash,
    derive,
    load_config,
    preset_names,
    read_preset,
    read_yaml_file,
    run_hash,
    save_config,
    second_teacher_config,
)
from attribution.config.rules import ConfigError, Rule, opt
from attribution.config.schema import *  # noqa: F403  (every section's dataclass and constants)
from attribution.config.schema import Config
from attribution.config.validate import (
    check_rules,
    planted_for,
    val_concept_rows,
    val_count,
    validation_k,
)

__all__ = ["Config", "ConfigError", "Rule", "check_rules", "config_hash", "derive",
           "load_config", "opt", "planted_for", "preset_names", "read_preset",
           "read_yaml_file", "run_hash", "save_config", "second_teacher_config", "to_dict",
           "val_concept_rows", "val_count", "validation_k"]
