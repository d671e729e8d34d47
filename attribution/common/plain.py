"""Config sections as plain data (dicts and lists), for hashing, JSON and stage records."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def to_dict(cfg: Any) -> dict:
    """An OmegaConf node (or a mapping) as a plain dict, interpolations resolved."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
