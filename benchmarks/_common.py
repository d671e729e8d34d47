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


def gemm_gflops(m: int, k: int, n: int, reps: int = 5) -> float:
    """fp32 matrix-multiply probe: best GFLOP/s of (m x k) @ (k x n) over ``reps`` runs, on
    the CPU with torch's threads (the yardstick for 'near the machine's peak')."""
    import time

    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * m * k * n / (time.perf_counter() - t))
    return best / 1e9
