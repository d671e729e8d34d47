"""How far a step change moves the teacher's top 10, by query kind: for each pair of neighbouring
factors of a finished step study (``attribution study teacher-steps CONFIG``), the share of the smaller
step's top 10 that lies inside the larger step's top m (m = 10, 20, 50, 100), on the queries that
prompt a planted concept and on the ordinary ones (mean ± s.e. over queries).  mAP@10 agreement
says *whether* the top 10 moved; this says how far.

Usage:  python experiments/studies/teacher_step_spread.py [CONFIG] [key=value ...] [--split test|val]
e.g.    python experiments/studies/teacher_step_spread.py configs/experiment/toy.yaml

Reads the study's files only (run the study first); writes nothing.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from attribution.common.machine import machine_line
from attribution.config import planted_for, to_dict
from attribution.counterfactual.study_files import load_row, query_file, summary_name
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet, study_query_set
from attribution.metrics import standard_error
from attribution.pipeline import script_pipeline as pipeline_args
from attribution.teacher.evaluate import planted_mask

CUTS = (10, 20, 50, 100)


def inside_shares(small: np.ndarray, large: np.ndarray, k: int = 10) -> list[float]:
    """Share of ``small``'s top ``k`` items inside ``large``'s top m, for m in CUTS."""
    place = np.empty(len(large), dtype=np.int64)
    place[np.argsort(-large, kind="stable")] = np.arange(len(large))
    top = np.argsort(-small, kind="stable")[:k]
    return [float(np.mean(place[top] < m)) for m in CUTS]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=("test", "val"), default="test")
    args, cfg, pipe = pipeline_args(ap)
    study = pipe.step_study_dir()
    found = study / summary_name(args.split)
    if not found.is_file():
        raise SystemExit(f"no one-step study at {found}: run `attribution study teacher-steps "
                         "CONFIG" + (" --split val`" if args.split == "val" else "`") + " first")
    summary = json.loads(found.read_text())
    if summary.get("path"):
        raise SystemExit(f"{study}: the last study of this split was a path study; rerun the "
                         "one-step study (`attribution study teacher-steps CONFIG`) first")
    factors = sorted(r["factor"] for r in summary["rows"]
                     if r.get("damping", cfg.teacher.damping) == cfg.teacher.damping)
    qids = summary["rows_scored"]
    n = len(CaptionedImageSet(pipe.dir("world"), verify=False))
    attrs = QuerySet(pipe.dir("queries") / f"query_{study_query_set(args.split)}").attributes
    concepts = planted_for(cfg.world, "test" if args.split == "test" else "val")
    kinds = planted_mask([attrs[q] for q in qids], [to_dict(p) for p in concepts])
    print(machine_line())
    print(f"{args.split} split, {len(qids)} queries ({int(kinds.sum())} planted): share of the "
          f"smaller step's top 10 inside the 10x larger step's top m (mean ± s.e.)")
    print(f"{'factors':<16}{'kind':<10}" + "".join(f"{'top ' + str(m):>16}" for m in CUTS))
    for small, large in zip(factors, factors[1:]):
        shares = np.array([inside_shares(load_row(query_file(study, small, q, split=args.split),
                                                  n)[0],
                                         load_row(query_file(study, large, q, split=args.split),
                                                  n)[0]) for q in qids])
        for kind, mask in (("planted", kinds), ("ordinary", ~kinds)):
            if mask.any():
                cells = "".join(f"{shares[mask, j].mean():>9.2f} ± {standard_error(shares[mask, j]):.2f}"
                                for j in range(len(CUTS)))
                print(f"{f'{small:g} -> {large:g}':<16}{kind:<10}{cells}")


if __name__ == "__main__":
    main()
