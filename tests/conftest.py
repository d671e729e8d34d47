"""Shared fixtures: the real smoke config, shrunk further, writing only under tmp paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attribution.config import load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "experiment" / "toy_smoke.yaml"


def smoke_config(output_root: Path, *overrides: str):
    """The shipped smoke experiment with its outputs under ``output_root``."""
    return load_config(SMOKE, [f"output_root={output_root}", *overrides])


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Run the smoke pipeline's world/text/generator stages once for the whole session."""
    from attribution.pipeline import Pipeline

    root = tmp_path_factory.mktemp("smoke_runs")
    cfg = smoke_config(root)
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    pipe.run(["generator"])
    return pipe
