"""End to end: one attribution query by the student vs by the teacher, side by side, and how
the ratio scales with the training-set size N.

Usage:  python benchmarks/e2e_bench.py [CONFIG] [key=value ...] [--queries 3]

Uses (and if needed builds) the pipeline's cached run for CONFIG (default: the smoke config, so
it runs from a fresh clone in a couple of minutes; pass configs/experiment/toy.yaml for the
real figures).  On the same test queries it times

- the teacher (AbU/AbU+ as configured): unlearning step + losses of N' candidates, for
  N' = N/4, N/2, N (its cost is linear in N'),
- the student end to end at batch 1: image + prompt -> features -> head -> exact search over
  the N items, and over the index tiled to 10 N and 100 N items (the search part grows with N,
  the feature extraction does not),

then prints the speed-up at N and a linear extrapolation to MSCOCO's N = 118,287.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import machine_line, pipeline_args

from attribution import retrieval
from attribution.student.deploy import deployed, test_images
from attribution.teacher.run import teacher_scorer

COCO_N = 118_287


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=3, help="test queries timed per setting")
    args, cfg, pipe = pipeline_args(ap)
    pipe.run(["student"])
    scorer, cands, tests = teacher_scorer(pipe.cfg, pipe.dirs(), "test")
    tests = tests[: args.queries]
    n = len(cands)
    print(machine_line())
    print(f"config: {args.config} {' '.join(args.overrides)}; N = {n} training items; "
          f"teacher {cfg.teacher.fisher}, {len(cfg.teacher.timesteps)} timesteps, "
          f"{cfg.teacher.query_draws} query draws; {len(tests)} test queries per setting")
    print(f"{'method':<34}{'N':>9}{'s/query':>12}{'queries/s':>12}")
    teacher = {}
    for frac in (4, 2, 1):
        m = n // frac
        times = []
        for q in tests:
            q = type(q)(q.split, q.query_id, q.z, q.cond, torch.arange(m))
            t0 = time.perf_counter()
            scorer.score(q)
            times.append(time.perf_counter() - t0)
        teacher[m] = float(np.mean(times))
        print(f"{'teacher (unlearn + score N)':<34}{m:>9}{teacher[m]:>12.3f}"
              f"{1 / teacher[m]:>12.4f}", flush=True)
    d = deployed(pipe.cfg, pipe.dirs())
    head, index, extractor = d.head, d.index, d.extractor
    images, captions = test_images(pipe.dir("queries"), 30)
    items = np.asarray(index.reconstruct_n(0, index.ntotal))
    student = {}
    with torch.no_grad():
        for tile in (1, 10, 100):
            idx = index if tile == 1 else retrieval.build_index(np.tile(items, (tile, 1)))
            for i in range(3):
                retrieval.search(idx, head.embed(extractor.extract(images[i], [captions[i]]))
                                 .numpy(), 10)
            t0 = time.perf_counter()
            for i in range(len(images)):
                retrieval.search(idx, head.embed(extractor.extract(images[i], [captions[i]]))
                                 .numpy(), 10)
            student[n * tile] = (time.perf_counter() - t0) / len(images)
            print(f"{'student (features+head+search)':<34}{n * tile:>9}"
                  f"{student[n * tile]:>12.5f}{1 / student[n * tile]:>12.1f}", flush=True)
    ratio = teacher[n] / student[n]
    slope = (teacher[n] - teacher[n // 4]) / (n - n // 4)  # seconds per extra candidate
    teacher_coco = teacher[n] + slope * (COCO_N - n)
    s_slope = (student[100 * n] - student[n]) / (99 * n)
    student_coco = student[n] + s_slope * (COCO_N - n)
    print(f"\nspeed-up of the student over the teacher at N={n}: {ratio:,.0f}x (measured)")
    print(f"teacher cost per extra candidate: {slope * 1e3:.3f} ms; student search per extra "
          f"item: {s_slope * 1e9:.2f} ns")
    print(f"linear extrapolation to N={COCO_N:,} on this machine and this generator: teacher "
          f"{teacher_coco:,.0f} s/query, student {student_coco * 1e3:.2f} ms/query, "
          f"speed-up ~{teacher_coco / student_coco:,.0f}x (the paper's generator is far larger "
          "per forward, which multiplies the teacher's side)")


if __name__ == "__main__":
    main()
