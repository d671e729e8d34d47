"""The published AbU+ step (gain N²) on a finished toy run: exact ascent against its quadratic
model, and both against the run's own teacher.

Usage:  python experiments/studies/teacher_published_step.py [CONFIG] [key=value ...] [--queries 10]
        [--split train|test]

The published recipe (``preset:abu_plus_step``) scales the Fisher by N², a step N times
smaller than this project's teacher (gain N).  At that step the candidates' loss change is
~N times smaller, so the exact ascent measures it as the difference of two float32 losses; the
quadratic model (``teacher.estimator: quadratic``) takes J·d at the gain-N perturbation and is
exact to second order.  For the first ``--queries`` queries of ``--split`` this prints, over
the items each is scored on (a training query's K-set, a test query's whole training set):
each ranking's mAP@10 against the others' top 10, and the exact ascent's influence against
the quadratic model's (relative L2 difference, rank correlation), so the second teacher's
estimator is chosen on evidence.  The default split is the training queries': the choice reads
no test query.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from attribution.callbacks import map_at_ks
from attribution.common.machine import machine_line
from attribution.config import derive
from attribution.pipeline import script_pipeline as pipeline_args
from attribution.teacher.run import teacher_scorer

OWN = "run's teacher"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--split", choices=["train", "test"], default="train")
    args, cfg, pipe = pipeline_args(ap)
    pipe.run(["teacher"])
    print(machine_line())
    dirs = pipe.dirs()
    variants = {OWN: {},
                "published, quadratic": {"gain_scale": "N2", "gain": None,
                                         "estimator": "quadratic"},
                "published, exact ascent": {"gain_scale": "N2", "gain": None,
                                            "estimator": "ascent"}}
    scores, seconds = {}, {}
    for name, change in variants.items():
        scorer, _, queries = teacher_scorer(derive(cfg, {"teacher": change}), dirs, args.split)
        rows, start = [], time.time()
        for q in queries[: args.queries]:
            rows.append(scorer.score(q)["influence"].numpy())
        seconds[name] = (time.time() - start) / args.queries
        scores[name] = np.stack(rows)
    ranks = {n: np.argsort(-s, axis=1, kind="stable") for n, s in scores.items()}
    print(f"{args.queries} {args.split} queries of {cfg.name}, {scores[OWN].shape[1]} items each")
    print(f"{'ranking':>26} " + " ".join(f"{'vs ' + n:>26}" for n in ranks) + "  s/query")
    for a, ra in ranks.items():
        cells = []
        for rb in ranks.values():
            m = map_at_ks(ra, rb, [10])
            cells.append(f"{m['mAP@10']:.3f} ± {m['mAP@10_stderr']:.3f}".rjust(26))
        print(f"{a:>26} " + " ".join(cells) + f"  {seconds[a]:.2f}")
    exact, model = scores["published, exact ascent"], scores["published, quadratic"]
    rel = np.linalg.norm(exact - model, axis=1) / np.linalg.norm(model, axis=1)
    rho = [spearmanr(e, m).correlation for e, m in zip(exact, model)]
    print(f"exact ascent vs quadratic model at gain N²: relative L2 difference "
          f"{rel.mean():.3f} (median {np.median(rel):.3f}), Spearman {np.mean(rho):.3f}; "
          f"typical |influence| {np.abs(model).mean():.2e} (run's teacher "
          f"{np.abs(scores[OWN]).mean():.2e})")


if __name__ == "__main__":
    main()
