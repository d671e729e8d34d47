"""The teacher under bf16 autocast against float32: does reduced precision keep its rankings?

Usage:  python benchmarks/teacher_precision.py [CONFIG] [key=value ...] [--queries 10]
        [--split train|test] [--fisher]

On a finished run (default: the main job), the first ``--queries`` queries of ``--split`` (the
training queries' K-sets by default: nothing here reads a test query) are scored twice by each
teacher — the run's own and the published AbU+ step (gain N², exact ascent) — once in float32
and once inside ``torch.autocast(dtype=bfloat16)`` (matrix products in bf16, the rest as
autocast decides), and each bf16 ranking is compared with its float32 twin by mAP@10 (the
positives: the float32 top 10).  It answers whether a ``precision: bf16`` setting could serve
the teacher; on the CPU autocast is slow, so the timings say nothing about a GPU.

``--fisher`` asks the same of ``teacher.fisher_precision=bf16`` instead: the EK-FAC Fisher
fitted again under bf16 autocast (into a scratch folder), the scoring float32 both times, and
each teacher's ranking with the bf16 Fisher compared with its ranking with the run's Fisher.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine_line, pipeline_args

from attribution.callbacks import map_at_ks
from attribution.config import derive
from attribution.teacher.run import teacher_scorer

TEACHERS = {"run's teacher": {},
            "published step (exact ascent)": {"gain_scale": "N2", "gain": None,
                                              "estimator": "ascent"}}


def _scores(cfg, dirs, split: str, n: int, bf16: bool) -> tuple[np.ndarray, float]:
    scorer, _, queries = teacher_scorer(cfg, dirs, split)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    rows, start = [], time.time()
    with ctx:
        for q in queries[:n]:
            rows.append(scorer.score(q)["influence"].float().numpy())
    return np.stack(rows), (time.time() - start) / n


def _fisher_main(args, cfg, pipe) -> None:
    import tempfile

    from attribution.teacher.run import fit_fisher

    dirs = pipe.dirs()
    with tempfile.TemporaryDirectory(dir=pipe.root) as tmp:
        start = time.time()
        fit_fisher(derive(cfg, {"teacher": {"fisher_precision": "bf16"}}), dirs["world"],
                   dirs["text"], dirs["generator"], Path(tmp), progress=False)
        print(f"bf16 EK-FAC fit: {time.time() - start:.1f} s (the run's float32 fit: "
              f"{pipe.finished('fisher')['seconds']:.1f} s)")
        print(f"{args.queries} {args.split} queries of {cfg.name}; mAP@10 of the ranking with "
              f"the bf16 Fisher against the top 10 with the float32 Fisher (scoring float32)")
        for name, change in TEACHERS.items():
            tcfg = derive(cfg, {"teacher": change})
            f32, _ = _scores(tcfg, dirs, args.split, args.queries, bf16=False)
            b16, _ = _scores(tcfg, {**dirs, "fisher": Path(tmp)}, args.split, args.queries,
                             bf16=False)
            m = map_at_ks(np.argsort(-b16, axis=1, kind="stable"),
                          np.argsort(-f32, axis=1, kind="stable"), [10])
            print(f"{name:>30}: mAP@10 {m['mAP@10']:.3f} ± {m['mAP@10_stderr']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--split", choices=["train", "test"], default="train")
    ap.add_argument("--fisher", action="store_true",
                    help="compare a bf16-fitted EK-FAC Fisher instead of bf16 scoring")
    args, cfg, pipe = pipeline_args(ap)
    pipe.run(["teacher"])
    print(machine_line())
    if args.fisher:
        return _fisher_main(args, cfg, pipe)
    print(f"{args.queries} {args.split} queries of {cfg.name}; mAP@10 of the bf16 ranking "
          f"against the float32 top 10")
    for name, change in TEACHERS.items():
        tcfg = derive(cfg, {"teacher": change})
        f32, s32 = _scores(tcfg, pipe.dirs(), args.split, args.queries, bf16=False)
        b16, s16 = _scores(tcfg, pipe.dirs(), args.split, args.queries, bf16=True)
        r32 = np.argsort(-f32, axis=1, kind="stable")
        r16 = np.argsort(-b16, axis=1, kind="stable")
        m = map_at_ks(r16, r32, [10])
        finite = np.isfinite(b16).all()
        rel = np.linalg.norm(b16 - f32, axis=1) / np.linalg.norm(f32, axis=1)
        print(f"{name:>30}: mAP@10 {m['mAP@10']:.3f} ± {m['mAP@10_stderr']:.3f}; relative L2 "
              f"{np.median(rel):.3g} (median); finite {finite}; s/query fp32 {s32:.2f}, "
              f"bf16 {s16:.2f}")


if __name__ == "__main__":
    main()
