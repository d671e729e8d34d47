"""Student training benchmark: training pairs/s and peak memory, through the real Lightning path.

Usage:  python benchmarks/student_bench.py [--items 100000] [--dim 1536] [--queries 4900]
                                           [--k 500] [--batches 16x128 64x128 256x128]
                                           [--steps 60] [--device auto]

Synthetic features and teacher rankings shaped like the paper's MSCOCO setting by default
(N = 100k items here instead of 118k, DINO+CLIP-text 768+768 = 1536-d features, 4,900 training
queries x K = 500 ranked candidates), so it runs from a fresh clone in about a minute.  For each
batch shape (queries per batch x pairs per query) it trains the default head (3 x 512, ce loss)
for ``--steps`` optimizer steps with PairDataModule + StudentModule + Lightning and reports
pairs/s after a warm-up, and peak memory (process RSS on the CPU, CUDA allocator peak on a GPU).
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

from attribution.student.data import PairDataModule
from attribution.student.head import EmbeddingHead
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=4900)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--batches", nargs="+", default=["16x128", "64x128", "256x128"])
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
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"features: N={args.items} items x {args.dim}-d, {args.queries} training queries x "
          f"K={args.k}; head 3x512, ce loss; {args.steps} steps ({args.warmup} warm-up)")
    print(f"{'batch (q x pairs)':>18} {'pairs/s':>10} {'steps/s':>8} {'peak memory':>14}")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for spec in args.batches:
        bq, ppq = (int(v) for v in spec.split("x"))
        L.seed_everything(0, verbose=False)
        dm = PairDataModule(ranks, args.items, bq, ppq, 0.1, None, 0)
        module = StudentModule(EmbeddingHead([args.dim, 512, 512, 512], 0.1, False, 5.0),
                               build_loss("ce"), items, queries)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timer = Timer(args.warmup)
        trainer = L.Trainer(max_steps=args.steps + args.warmup, accelerator=device, devices=1,
                            logger=False, callbacks=[timer], enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        pairs = timer.batches * bq * ppq
        if device == "cuda":
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            peak = f"{rss:.0f} MiB RSS"
        print(f"{spec:>18} {pairs / timer.seconds:>10.0f} {timer.batches / timer.seconds:>8.1f} "
              f"{peak:>14}", flush=True)
    print(f"(process RSS before training: {base_rss:.0f} MiB; CPU RSS is the process peak so "
          "far, features included)")


if __name__ == "__main__":
    main()
