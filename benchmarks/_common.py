"""What the pipeline-backed benchmarks share: CONFIG [key=value ...] arguments, the offline hub
setting, the cached pipeline, and the machine line every table starts with."""

from __future__ import annotations

import argparse
import os
import platform

import torch

from attribution.config import load_config
from attribution.pipeline import Pipeline


def pipeline_args(ap: argparse.ArgumentParser):
    """Parse CONFIG (default: the smoke config, fast from a fresh clone) + overrides + the
    benchmark's own options; -> (args, cfg, pipeline)."""
    ap.add_argument("config", nargs="?", default="configs/experiment/toy_smoke.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    return args, cfg, Pipeline(cfg, progress=False, echo=lambda s: None)


def machine_line() -> str:
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
            f"{torch.get_num_threads()}, torch {torch.__version__}")
