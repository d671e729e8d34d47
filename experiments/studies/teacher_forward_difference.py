"""The quadratic teacher's forward difference against its central one (``teacher.difference``).

The quadratic model of AbU's loss change, 2η·mean(r0·a) + η²·mean(a²), needs a = J·d on every
candidate sample.  ``central`` differences at θ0 ± s·η·d (two forward sweeps a query);
``forward`` at θ0 + s·η·d against θ0's predictions, computed once for every item and held (one
sweep a query), with an O(s) truncation error where the central one's is O(s²), and float32
rounding growing as 1/s.  Here, per choosing query of the step study's val split (training
queries, each over every item; no test query is read), the forward ranking at each step s is
compared with the central ranking at s = ``DIFFERENCE_FACTOR``: mAP@10 agreement, relative L2
of the loss changes, top-10 items shared.  And seconds per query of each.

Usage:  python experiments/studies/teacher_forward_difference.py [CONFIG] [key=value ...] [--queries N]
                [--kind ordinary|concept|all] [--steps 1e-3 3e-4 1e-4]
e.g.    python experiments/studies/teacher_forward_difference.py configs/experiment/toy_evidence.yaml \\
            --queries 12 --kind ordinary

Needs the generator, Fisher and queries stages (builds them if needed); reads the teacher
stage's cached base losses and stage-1 candidates (computes them if missing); writes nothing
else.  Holds every item's sample inputs and θ0's predictions in memory (the toy worlds).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from attribution.callbacks import ap_at_k
from attribution.common.machine import machine_line
from attribution.config import val_concept_rows
from attribution.data.queries import study_query_set
from attribution.pipeline import script_pipeline as pipeline_args
from attribution.studies.teacher_steps import study_rows
from attribution.teacher.predictions import DIFFERENCE_FACTOR, FORWARD_FACTOR, iter_samples
from attribution.teacher.predictions import quadratic_influence as influence
from attribution.teacher.run import teacher_scorer
from attribution.teacher.scorer import Query


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=12, help="choosing queries (val split)")
    ap.add_argument("--kind", choices=("ordinary", "concept", "all"), default="all",
                    help="the first N ordinary choosing queries, those on the validation "
                         "concepts, or of all (ordinary first)")
    ap.add_argument("--steps", type=float, nargs="+", default=(1e-3, FORWARD_FACTOR, 1e-4),
                    help="forward difference steps s (× η)")
    args, cfg, pipe = pipeline_args(ap)
    pipe.run(["fisher", "queries"])
    dirs = pipe.dirs()
    scorer, cands, found = teacher_scorer(cfg, dirs, study_query_set("val"))
    queries = {q.query_id: q for q in found}
    n, eta = len(cands), scorer.tc.eta
    samples = list(iter_samples(scorer.cands, scorer.alphas, torch.arange(n), scorer.tc,
                                scorer.seed, scorer.device))
    start = time.perf_counter()
    scorer.base_predictions(torch.arange(1))
    table_seconds = time.perf_counter() - start
    held = set(val_concept_rows(cfg))
    rows = [r for r in study_rows(cfg, dirs, "val", None)
            if args.kind == "all" or (r in held) == (args.kind == "concept")][: args.queries]
    out: dict[float, list[tuple[float, float, int]]] = {s: [] for s in args.steps}
    seconds: dict[str, list[float]] = {"central": [], "forward": []}
    print(machine_line())
    print(f"config: {args.config} {' '.join(args.overrides)}; {len(rows)} val queries over "
          f"{n} items; θ0's prediction table built in {table_seconds:.1f} s")
    for qid in rows:
        q = queries[qid]
        q = Query(q.split, q.query_id, q.z, q.cond, torch.arange(n))
        start = time.perf_counter()
        _, _, slope, curve = scorer.quadratic_terms(q, samples, DIFFERENCE_FACTOR)
        seconds["central"].append(time.perf_counter() - start)
        ref = influence(slope, curve, eta).numpy()
        ref_rank = np.argsort(-ref, kind="stable")
        line = []
        for s in args.steps:
            start = time.perf_counter()
            _, _, slope, curve = scorer.quadratic_terms(q, samples, s, forward=True)
            seconds["forward"].append(time.perf_counter() - start)
            got = influence(slope, curve, eta).numpy()
            rank = np.argsort(-got, kind="stable")
            out[s].append((float(ap_at_k(rank[None], ref_rank[None], 10)[0]),
                           float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                           len(set(rank[:10].tolist()) & set(ref_rank[:10].tolist()))))
            line.append(f"s={s:g}: {out[s][-1][0]:.3f} / {out[s][-1][1]:.1e}")
        print(f"query {qid}: " + ", ".join(line), flush=True)
    print("forward step s (x eta) | mAP@10 vs central (worst) | relative L2 median (worst) "
          "| top-10 shared")
    for s, v in out.items():
        a = np.array(v)
        print(f"{s:g} | {a[:, 0].mean():.4f} ({a[:, 0].min():.3f}) | {np.median(a[:, 1]):.1e} "
              f"({a[:, 1].max():.1e}) | {a[:, 2].mean():.2f}")
    print(f"seconds a query (gradient included): central {np.mean(seconds['central']):.2f}, "
          f"forward {np.mean(seconds['forward']):.2f}")


if __name__ == "__main__":
    main()
