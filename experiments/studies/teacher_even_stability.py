"""Is the even part of the loss change more stable to a 10× step than the ascent?  Paired over
the queries of a finished ``--even`` step study (``attribution study teacher-steps CONFIG --even``):
per query, the mAP@10 agreement of the even ranking at factor E with the even ranking at 10·E,
minus the agreement of the ascent (the one-step teacher) at factor A with the ascent at 10·A;
mean ± s.e. overall, on the queries that prompt a planted concept and on the ordinary ones.

Usage:  python experiments/studies/teacher_even_stability.py [CONFIG] [key=value ...] [--split test|val]
                [--even E] [--ascent A]
e.g.    python experiments/studies/teacher_even_stability.py configs/experiment/toy_evidence.yaml
            --split val --even 0.01 --ascent 1

Reads the study's files only (score E, 10·E, A and 10·A with --even first); writes nothing.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from attribution.callbacks import ap_at_k
from attribution.common.machine import machine_line
from attribution.config import planted_for, to_dict
from attribution.counterfactual.run import method_ranks
from attribution.counterfactual.study_files import summary_name
from attribution.data.queries import QuerySet, study_query_set
from attribution.metrics import standard_error
from attribution.pipeline import script_pipeline as pipeline_args
from attribution.teacher.evaluate import planted_mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--even", type=float, default=0.01, help="the even part's factor E")
    ap.add_argument("--ascent", type=float, default=1.0, help="the ascent's factor A")
    args, cfg, pipe = pipeline_args(ap)
    study = pipe.step_study_dir()
    qids = json.loads((study / summary_name(args.split, even=True)).read_text())["rows_scored"]
    dirs = {**pipe.dirs(), "steps": study}
    pairs = {"even": (f"teacher-even@{args.even:g}", f"teacher-even@{10 * args.even:g}"),
             "ascent": (f"teacher@{args.ascent:g}", f"teacher@{10 * args.ascent:g}")}
    ranks = method_ranks(cfg, dirs, [m for pair in pairs.values() for m in pair], args.split)
    missing = [m for m, r in ranks.items() if (r[qids] < 0).any()]
    if missing:
        raise SystemExit(f"the study has not scored {missing} on every query of its "
                         f"{args.split} split: run `attribution study teacher-steps CONFIG --even "
                         f"--factors {args.even:g} {10 * args.even:g} {args.ascent:g} "
                         f"{10 * args.ascent:g}" + (" --split val`" if args.split == "val" else "`"))
    agree = {kind: ap_at_k(ranks[a][qids], ranks[b][qids], 10) for kind, (a, b) in pairs.items()}
    attrs = QuerySet(pipe.dir("queries") / f"query_{study_query_set(args.split)}").attributes
    concepts = planted_for(cfg.world, "test" if args.split == "test" else "val")
    planted = planted_mask([attrs[q] for q in qids], [to_dict(p) for p in concepts])
    diff = agree["even"] - agree["ascent"]
    print(machine_line())
    print(f"{args.split} split, {len(qids)} queries ({int(planted.sum())} planted): mAP@10 "
          f"agreement with the 10x larger step, even part at {args.even:g} vs ascent at "
          f"{args.ascent:g} (mean ± s.e.; difference paired per query)")
    print(f"{'queries':<10}{'even':>16}{'ascent':>16}{'even - ascent':>22}")
    for kind, mask in (("all", np.ones_like(planted)), ("planted", planted),
                       ("ordinary", ~planted)):
        if mask.any():
            cells = [f"{x[mask].mean():>9.3f} ± {standard_error(x[mask]):.3f}"
                     for x in (agree["even"], agree["ascent"])]
            d = diff[mask]
            print(f"{kind:<10}{cells[0]:>16}{cells[1]:>16}"
                  f"{d.mean():>+13.3f} ± {standard_error(d):.3f}")


if __name__ == "__main__":
    main()
