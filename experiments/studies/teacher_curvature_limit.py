"""The even part's step-free limit: does ½·dᵀ∇²L_j·d rank like the even part at a finite step?

The even part of the loss change (``attribution study teacher-steps CONFIG --even``) is
E_j(η) = ½η²·dᵀ∇²L_j·d + O(η⁴); read from two losses it sinks into their float32 rounding at
small η.  Here the curvature along the unlearning direction d is taken from the generator's
PREDICTIONS instead of its losses, which removes that cancellation: with p(θ) the noise
prediction on one (item, caption, t) sample, r0 = p(θ0) − ε, and central differences at a step s,

    a = (p(θ0 + s·d) − p(θ0 − s·d)) / 2s        (J·d, the prediction's first derivative along d)
    b = (p(θ0 + s·d) + p(θ0 − s·d) − 2p(θ0)) / s²  (its second derivative along d)
    ℓ''(0) = 2·mean(a²) + 2·mean(r0·b)          (mean over the sample's elements)

mean(a²) is the Gauss–Newton part (never negative, no cancellation at all); mean(r0·b) the
residual part.  Per item both are averaged over its captions and timesteps as the teacher's loss
is.  Three known-answer checks are printed: the central difference's J·d against the exact
forward-mode product (``torch.func.jvp``, on one batch); the loss-level even part rebuilt from
these predictions against the step study's stored even part at the same factor (same noise,
same items); and the limit taken at two steps s (have the differences converged?).  Then,
per query of the study's split: each limit ranking's mAP@10 agreement with the study's even
rankings and the one-step teacher's, and the planted concepts' recall@10.

``--quadratic``: also the ascent's loss change under its Gauss–Newton quadratic model,
ΔL_j(η) ≈ 2η·mean(r0·a) + η²·mean(a²), ranked at each step factor — a teacher with a step
again, whose stability to a 10× change can be asked — against the study's exact ascent.

Usage:  python experiments/studies/teacher_curvature_limit.py [CONFIG] [key=value ...] [--split val]
                [--queries N] [--steps 0.001 0.01] [--quadratic [FACTOR ...]]
e.g.    python experiments/studies/teacher_curvature_limit.py configs/experiment/toy_evidence.yaml \
            teacher.estimator=ascent --split val

Needs the generator, Fisher, queries and teacher stages and a finished ``--even`` step study
(its factors are the comparison); writes nothing.  Costs 2 forward sweeps over every item's
samples per query and step, plus one at θ0, and holds every sample's input and prediction in
memory (a probe for the toy worlds, not for a released-scale training set).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from attribution.callbacks import ap_at_k
from attribution.common.machine import machine_line
from attribution.config import planted_for, to_dict
from attribution.counterfactual.study_files import load_row, query_file, summary_name
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet, study_query_set
from attribution.metrics import standard_error
from attribution.pipeline import script_pipeline as pipeline_args
from attribution.studies.curvature import exact_prediction_jvp
from attribution.studies.teacher_steps import even_part
from attribution.teacher.evaluate import planted_known_answers, planted_mask
from attribution.teacher.predictions import (
    by_view,
    central_jd,
    per_item,
    predictions,
    predictions_both_ways,
    quadratic_influence,
    sample_inputs,
)
from attribution.teacher.run import teacher_scorer
from attribution.teacher.scorer import Query


def exact_jvp_error(scorer, d: dict, batch: tuple, steps: list[float]) -> dict[float, float]:
    """Known answer for the central difference: its J·d against the exact forward-mode one
    (``curvature.exact_prediction_jvp``) on one batch, relative L2 error per step factor."""
    exact = exact_prediction_jvp(scorer.unet, scorer.params, d, batch)
    return {s: float((central_jd(scorer, d, [batch], scorer.tc.eta * s) - exact).norm()
                     / exact.norm()) for s in steps}


def report_quadratic(slope, curve, eta, qfactors, factors, ascent, gn, items, attrs,
                     concepts, planted) -> None:
    """The quadratic model's rankings by step factor: its error against the exact ascent the
    study stored (a known answer at small steps, where the cubic terms vanish), planted
    recall@10, agreement with the 10× larger factor and with the exact ascent and GN limit."""
    model = {f: np.stack([quadratic_influence(s, c, eta * f).numpy()
                          for s, c in zip(slope, curve)]) for f in qfactors}
    for f in (f for f in qfactors if f in factors):
        want = ascent(f)
        err = np.linalg.norm(model[f] - want, axis=1) / np.linalg.norm(want, axis=1)
        print(f"known answer at factor {f:g}: the quadratic model vs the study's exact ascent, "
              f"relative L2 error per query: median {np.median(err):.1e}, worst {err.max():.1e}")
    qr = {f: np.argsort(-m, axis=1, kind="stable") for f, m in model.items()}
    print("quadratic model by factor: recall@10, mAP@10 ± s.e. (planted / ordinary) vs 10x, "
          "vs 0.1x, vs the exact ascent at the same factor, vs the GN limit")

    def cell(a, b):
        c = ap_at_k(a, b, 10)
        kinds = " / ".join(f"{c[m].mean():.3f}" if m.any() else "-" for m in (planted, ~planted))
        return f"{c.mean():.3f} ± {standard_error(c):.3f} ({kinds})"

    def near(f):  # factors are floats: 0.1 × 10 is looked up by closeness
        return next((r for g, r in qr.items() if np.isclose(g, f)), None)

    for f, r in qr.items():
        known = planted_known_answers(items, attrs, r, concepts)
        recall = " / ".join(f"{v['recall@10']:.2f}" for v in known.values())
        print(f"factor {f:g}: recall@10 {recall}")
        for name, other in (("vs 10x", near(f * 10)), ("vs 0.1x", near(f / 10)),
                            ("vs ascent", np.argsort(-ascent(f), axis=1, kind="stable")
                             if f in factors else None), ("vs GN", gn)):
            if other is not None:
                print(f"   {name:<10}{cell(r, other)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=("test", "val"), default="val")
    ap.add_argument("--queries", type=int, default=None, help="first N of the study's queries")
    ap.add_argument("--steps", type=float, nargs="+", default=(1e-3, 1e-2),
                    help="step factors for the central differences (the first is the limit's)")
    ap.add_argument("--quadratic", type=float, nargs="*", default=None, metavar="FACTOR",
                    help="also rank by the Gauss–Newton quadratic model of the ascent's loss "
                         "change at these step factors (default: the study's, and 100)")
    args, cfg, pipe = pipeline_args(ap)
    study = pipe.step_study_dir()
    summary = even_study(args, cfg, study)
    qids = summary["rows_scored"][: args.queries]
    factors = sorted({r["factor"] for r in summary["rows"]})
    m = measure(args, cfg, pipe.dirs(), study, qids, factors)
    print_limits(args, cfg, pipe.dirs(), qids, factors, m)


def even_study(args, cfg, study: Path) -> dict:
    """The summary of the finished even study in ``study`` this probe reads, or exit saying
    what to run."""
    if cfg.teacher.estimator != "ascent":
        raise SystemExit("this probe compares with the exact ascent's step study: add "
                         "teacher.estimator=ascent (the toy configs' teacher is the quadratic "
                         "model)")
    found = study / summary_name(args.split, even=True)
    if not found.is_file():
        raise SystemExit(f"no even study at {found}: run `attribution study teacher-steps CONFIG "
                         f"--even --factors {' '.join(f'{s:g}' for s in args.steps)} 0.1 1 10"
                         + (" --split val`" if args.split == "val" else "`") + " first")
    return json.loads(found.read_text())


def measure(args, cfg, dirs, study: Path, qids: list[int], factors: list[float]) -> dict:
    """Per query and central-difference step: the GN and full curvature limits, the quadratic
    model's terms, and the known-answer errors (J·d against forward mode, the even part
    rebuilt from predictions against the study's files)."""
    tc = cfg.teacher
    scorer, cands, found = teacher_scorer(cfg, dirs, study_query_set(args.split))
    queries = {q.query_id: q for q in found}
    n = len(cands)
    everything = torch.arange(n)
    views = 2 if tc.flips else 1
    inputs, eps = sample_inputs(cands, scorer.alphas, everything, tc, cfg.seed)
    unet = scorer.unet
    p0 = predictions(unet, inputs)
    r0 = p0 - eps
    loss0 = r0.pow(2).flatten(1).mean(1)

    def stored(kind: float, qid: int) -> np.ndarray:
        return load_row(query_file(study, kind, qid, None, args.split), n)[0]

    limits = {f"{kind}@{s:g}": [] for s in args.steps for kind in ("gn", "full")}
    slope, curve = [], []  # per query (n, views): mean(r0·a) and mean(a²) at the first step
    # (the quadratic model's terms, as teacher/predictions.py takes them but with the exact p0)
    rebuilt_err: dict[float, list[float]] = {}
    seconds = []
    for qid in qids:
        start = time.time()
        q = queries[qid]
        if args.split == "val":
            q = Query(q.split, q.query_id, q.z, q.cond, everything)
        d, _ = scorer.direction(q)  # the teacher's own query gradient, preconditioned
        if qid == qids[0]:
            jvp_err = exact_jvp_error(scorer, d, inputs[0], args.steps)
        for s in args.steps:
            step = tc.eta * s
            plus, minus = predictions_both_ways(scorer, d, inputs, step)
            out = {1.0: plus, -1.0: minus}
            a = (out[1.0] - out[-1.0]) / (2 * step)
            b = (out[1.0] + out[-1.0] - 2 * p0) / step**2
            gn = a.pow(2).flatten(1).mean(1)
            if s == args.steps[0]:
                slope.append(by_view((r0 * a).flatten(1).mean(1), n, views))
                curve.append(by_view(gn, n, views))
            limits[f"gn@{s:g}"].append(per_item(gn, n, views).numpy())
            limits[f"full@{s:g}"].append(
                per_item(gn + (r0 * b).flatten(1).mean(1), n, views).numpy())
            if s in factors:  # known answer: the study's even part, rebuilt from predictions
                ev = 0.5 * sum((out[g] - eps).pow(2).flatten(1).mean(1) - loss0
                               for g in (1.0, -1.0))
                want = 0.5 * (stored(s, qid) + stored(-s, qid))
                got = per_item(ev, n, views).numpy()
                rebuilt_err.setdefault(s, []).append(
                    float(np.linalg.norm(got - want) / np.linalg.norm(want)))
        seconds.append(time.time() - start)
    return {"limits": limits, "slope": slope, "curve": curve, "rebuilt_err": rebuilt_err,
            "seconds": seconds, "jvp_err": jvp_err, "samples": len(inputs[0][1]),
            "stored": stored}


def print_limits(args, cfg, dirs, qids: list[int], factors: list[float], m: dict) -> None:
    """The tables: every limit against the others and against the study's rankings."""
    limits, stored, seconds = m["limits"], m["stored"], m["seconds"]
    tc = cfg.teacher
    ranks = {name: np.argsort(-np.stack(v), axis=1, kind="stable") for name, v in limits.items()}
    even = even_part({(sign * f, None): (np.stack([stored(sign * f, q) for q in qids]), [])
                      for f in factors for sign in (1.0, -1.0)})
    refs = {f"even@{f:g}": np.argsort(-even[(f, None)][0], axis=1, kind="stable")
            for f in factors}
    refs["teacher (ascent @1)"] = np.argsort(-np.stack([stored(1.0, q) for q in qids]), axis=1,
                                             kind="stable")
    world = CaptionedImageSet(dirs["world"], verify=False)
    attrs = QuerySet(dirs["queries"] / f"query_{study_query_set(args.split)}").attributes
    attrs = [attrs[q] for q in qids]
    concepts = [to_dict(p) for p in planted_for(cfg.world, "test" if args.split == "test"
                                                 else "val")]
    planted = planted_mask(attrs, concepts)

    print(machine_line())
    print(f"{args.split} split, {len(qids)} queries ({int(planted.sum())} planted), "
          f"{np.mean(seconds):.1f} s a query for {len(args.steps)} steps")
    print(f"known answer: the central difference's J·d against the exact forward-mode one "
          f"(query {qids[0]}, its first {m['samples']} samples), relative L2 error: "
          + ", ".join(f"s = {s:g}: {e:.1e}" for s, e in m['jvp_err'].items()))
    for s, err in m['rebuilt_err'].items():  # ~0 where the even part stands clear of float32's
        print(f"known answer at factor {s:g}: the even part rebuilt from predictions vs the "
              f"study's files, relative L2 error per query: median {np.median(err):.1e}, "
              f"worst {max(err):.1e}")  # rounding (docs/results.md: not at 1e-3 everywhere)
    names = list(ranks)
    print(f"{'ranking':<22}" + "".join(f"{n:>16}" for n in names[1:]))
    for name in names[:-1]:
        cells = [ap_at_k(ranks[name], ranks[o], 10) for o in names[1:]]
        print(f"{name:<22}" + "".join(f"{c.mean():>9.3f} ± {standard_error(c):.3f}"
                                       for c in cells))
    print("\nagreement (mAP@10, ± s.e.; planted / ordinary) with the study's rankings, and "
          "planted recall@10")
    for name, r in ranks.items():
        known = planted_known_answers(world.attributes, attrs, r, concepts)
        recall = " / ".join(f"{v['recall@10']:.2f}" for v in known.values())
        print(f"{name}: recall@10 {' / '.join(known)} {recall}")
        for ref, rr in refs.items():
            c = ap_at_k(r, rr, 10)
            kinds = " / ".join(f"{c[m].mean():.3f}" if m.any() else "-"
                               for m in (planted, ~planted))
            print(f"   vs {ref:<20}{c.mean():.3f} ± {standard_error(c):.3f} ({kinds})")
    if args.quadratic is not None:
        print()
        report_quadratic(m['slope'], m['curve'], tc.eta,
                         sorted(set(args.quadratic or [*factors, 100.0])), factors,
                         lambda f: np.stack([stored(f, q) for q in qids]),
                         ranks[f"gn@{args.steps[0]:g}"],  # the model's large-step limit
                         world.attributes, attrs, concepts, planted)


if __name__ == "__main__":
    main()
