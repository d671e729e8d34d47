"""Student training benchmark: pairs/s, FLOP/s against a GEMM probe, and peak memory, through
the real Lightning path, for the shipped head kinds.

Usage:  python benchmarks/student_bench.py [--items 100000] [--dim 1280] [--queries 4900]
                                           [--k 500] [--heads mlp:768x4 mlp:512x3 linear
                                           residual:768] [--batches 32x128] [--steps 60]
                                           [--device auto]

Synthetic features and teacher rankings shaped like the paper's MSCOCO setting by default
(N = 100k items instead of 118k, DINO+CLIP-text 1280-d features, 4,900 training queries x K = 500
ranked candidates), so it runs from a fresh clone in a few minutes.  For each head (kind:widths)
and batch shape (queries per batch x pairs per query) it trains with PairDataModule +
StudentModule + Lightning (ce loss) for ``--steps`` optimizer steps after a warm-up and reports
pairs/s, the head's achieved GFLOP/s (rows embedded per step x the head's forward FLOPs x 3 for
forward + backward, the usual estimate), and that as a share of two probes measured in the same
run: a square 2048^3 fp32 GEMM, and a GEMM of the head's own first-layer shape (rows x D_in x
width).  Peak memory: process RSS on the CPU, CUDA allocator peak on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import lightning as L
import numpy as np
import torch
from _common import gemm_gflops

from attribution.student.data import PairDataModule
from attribution.student.head import EmbeddingHead, head_dims
from attribution.student.losses import build_loss
from attribution.student.module import StudentModule


class Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.batches = warmup, None, 0

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(module)
            self.start, self.batches = time.perf_counter(), 0
        elif self.start is not None:
            self.batches += 1

    def on_train_end(self, trainer, module):
        self._sync(module)
        self.seconds = time.perf_counter() - self.start


def parse_head(spec: str, dim: int) -> tuple[str, list[int]]:
    """'mlp:768x4' | 'mlp:512,256' | 'linear' | 'residual:768' -> (kind, dims)."""
    kind, _, widths = spec.partition(":")
    if "x" in widths:
        width, times = widths.split("x")
        hidden = [int(width)] * int(times)
    else:
        hidden = [int(w) for w in widths.split(",")] if widths else [dim]
    return kind, head_dims(kind, dim, hidden)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=4900)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--heads", nargs="+",
                    default=["mlp:768x4", "mlp:512x3", "linear", "residual:768"])
    ap.add_argument("--batches", nargs="+", default=["32x128"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    rng = np.random.default_rng(0)
    items = torch.from_numpy(rng.standard_normal((args.items, args.dim), dtype=np.float32))
    queries = torch.from_numpy(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    ranks = np.stack([rng.choice(args.items, args.k, replace=False)
                      for _ in range(args.queries)]).astype(np.int64)
    square = gemm_gflops(2048, 2048, 2048)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"features: N={args.items} items x {args.dim}-d, {args.queries} training queries x "
          f"K={args.k}; ce loss; {args.steps} steps ({args.warmup} warm-up); GEMM probe "
          f"2048^3: {square:.0f} GFLOP/s" + (" (CPU probe; GPU rows are not compared)"
                                             if device == "cuda" else ""))
    print(f"{'head':>14} {'params':>7} {'batch':>7} {'pairs/s':>9} {'steps/s':>8} "
          f"{'GFLOP/s':>8} {'%2048^3':>8} {'%shape':>7} {'peak memory':>14}")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for head_spec in args.heads:
        kind, dims = parse_head(head_spec, args.dim)
        for spec in args.batches:
            bq, ppq = (int(v) for v in spec.split("x"))
            L.seed_everything(0, verbose=False)
            dm = PairDataModule(ranks, args.items, bq, ppq, 0.1, None, 0)
            head = EmbeddingHead(dims, 0.1, False, 5.0, kind)
            module = StudentModule(head, build_loss("ce"), items, queries)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timer = Timer(args.warmup)
            trainer = L.Trainer(max_steps=args.steps + args.warmup, accelerator=device,
                                devices=1, logger=False, callbacks=[timer],
                                enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False, num_sanity_val_steps=0,
                                limit_val_batches=0)
            trainer.fit(module, datamodule=dm)
            pairs = timer.batches * bq * ppq
            rows = bq * (ppq + 1)  # items (at most B x P distinct) + B queries per step
            gflops = timer.batches * rows * head.flops_per_row() * 3 / timer.seconds / 1e9
            shaped = gemm_gflops(rows, dims[0], dims[1]) if device == "cpu" else float("nan")
            if device == "cuda":
                peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
            else:
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                peak = f"{rss:.0f} MiB RSS"
            n_params = sum(p.numel() for p in head.parameters())
            print(f"{head_spec:>14} {n_params / 1e6:6.2f}M {spec:>7} "
                  f"{pairs / timer.seconds:>9.0f} {timer.batches / timer.seconds:>8.1f} "
                  f"{gflops:>8.0f} {100 * gflops / square:>7.0f}% "
                  f"{100 * gflops / shaped:>6.0f}% {peak:>14}", flush=True)
    print(f"(process RSS before training: {base_rss:.0f} MiB; CPU RSS is the process peak so "
          "far, features included)")


if __name__ == "__main__":
    main()
