"""What the pipeline-backed benchmarks share: CONFIG [key=value ...] arguments, the offline hub
setting, the cached pipeline, and the machine line every table starts with."""

from __future__ import annotations

import torch

from attribution.common.machine import machine_line  # noqa: F401  (the scripts import it here)
from attribution.pipeline import script_pipeline as pipeline_args  # noqa: F401


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
