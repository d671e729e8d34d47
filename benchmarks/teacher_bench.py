"""Teacher benchmark: seconds per query, generator forwards/s, and batched vs per-item loop.

Usage:  python benchmarks/teacher_bench.py [CONFIG] [key=value ...] [--items 300]

Uses (and if needed builds) the pipeline's cached world, generator, Fisher and queries for
CONFIG (default: the smoke config, so it runs from a fresh clone in about a minute).  Both
scoring paths run on the same query and the same candidate items, one after the other.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine_line, pipeline_args

from attribution.teacher.run import teacher_scorer
from attribution.teacher.scoring import candidate_losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=300, help="candidates timed in both paths")
    args, cfg, pipe = pipeline_args(ap)
    pipe.run(["fisher", "queries"])
    scorer, cands, queries = teacher_scorer(pipe.cfg, pipe.dirs(), "test")
    tc = cfg.teacher
    per_item = tc.captions * len(tc.timesteps) * (2 if tc.flips else 1)
    n = min(args.items, len(cands))
    ids = torch.arange(n)
    common = (scorer.unet, scorer.alphas, cands, ids, list(tc.timesteps), tc.captions, tc.flips,
              cfg.seed)
    candidate_losses(*common, batch_size=tc.batch_size)  # warm-up
    t0 = time.perf_counter()
    batched = candidate_losses(*common, batch_size=tc.batch_size)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = candidate_losses(*common, batch_size=1)
    t_loop = time.perf_counter() - t0
    assert torch.allclose(batched, loop, atol=1e-5), "batched and loop losses differ"
    q = queries[0]
    t0 = time.perf_counter()
    res = scorer.score(q)
    t_query = time.perf_counter() - t0
    fwd = n * per_item
    print(machine_line())
    print(f"config: {args.config} {' '.join(args.overrides)}")
    print(f"training items N={len(cands)}; forwards per candidate={per_item} "
          f"({tc.captions} captions x {len(tc.timesteps)} timesteps x "
          f"{2 if tc.flips else 1} views); query draws={tc.query_draws}")
    print(f"{'path':<28}{'seconds':>10}{'forwards/s':>13}")
    label = f"batched (bs={tc.batch_size})"
    print(f"{label:<28}{t_batched:>10.3f}{fwd / t_batched:>13.1f}")
    print(f"{'per-item loop (bs=1)':<28}{t_loop:>10.3f}{fwd / t_loop:>13.1f}")
    print(f"speed-up of batched over loop: {t_loop / t_batched:.1f}x (same {n} items, same losses)")
    print(f"one full test query (N={len(cands)} candidates + unlearning step): "
          f"{t_query:.2f} s/query; query loss {res['query_loss_before']:.4f} -> "
          f"{res['query_loss_after']:.4f}")


if __name__ == "__main__":
    main()
