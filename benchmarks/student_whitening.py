"""What input whitening does, on a finished toy run: the untuned features, the same features
whitened (the whitened student's step 0, no training) and the run's trained student, side by
side — test mAP@10 on ordinary and planted-concept queries, each planted concept's recall@10,
and validation mAP@10 on the validation concepts' queries and on the rest.

Usage:  python benchmarks/student_whitening.py [CONFIG] [key=value ...] [--shrinkage S ...]
e.g.    python benchmarks/student_whitening.py configs/experiment/toy_evidence.yaml

Reuses the pipeline's finished stages for CONFIG (runs the missing ones up to the student);
writes nothing.  The whitening is fitted on the training items' features only.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

from attribution.callbacks import ValidationCallback, map_at_ks, rank_all
from attribution.config import load_config, val_concept_rows
from attribution.evaluation import known_answer_recall, query_types
from attribution.features.cache import load_features, space_dir
from attribution.pipeline import Pipeline
from attribution.student.data import load_rankings
from attribution.student.deploy import load_head
from attribution.student.head import whitening
from attribution.student.train import split_validation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/experiment/toy_smoke.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--shrinkage", type=float, nargs="*", default=[0.1, 0.01, 0.001])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    pipe.run(["student"])
    sc = cfg.student
    raw = {k: torch.as_tensor(np.array(v), dtype=torch.float32) for k, v in
           load_features(space_dir(pipe.dir("features"), sc.feature)).items()}
    ranks = load_rankings(pipe.dir("teacher"), raw["items"].shape[0])
    types = query_types(cfg, pipe.dir("queries"))
    held = val_concept_rows(cfg)
    val_rows, _ = split_validation(ranks.train.shape[0], sc.val_queries, cfg.seed, held)
    planted_val = np.isin(val_rows, held)
    head = load_head(pipe.dir("student"))
    methods = {"untuned features": lambda x: F.normalize(x, dim=-1)}
    for s in args.shrinkage:
        mu, w = whitening(raw["items"], s)
        methods[f"whitened, s={s:g} (step 0)"] = (
            lambda x, mu=mu, w=w: F.normalize((x - mu) @ w, dim=-1))
    methods[f"trained student ({sc.head}, whiten={sc.whiten:g})"] = head.embed
    print(f"{cfg.name}: {sc.feature}, {len(types.get('planted', []))} test queries, "
          f"{len(val_rows)} validation queries ({int(planted_val.sum())} on validation concepts)")
    print(f"{'':42s} {'test ord':>9s} {'test pl.':>9s} {'val ord':>8s} {'val pl.':>8s}  recall@10")
    val = ValidationCallback(raw["items"], raw["query_train"][val_rows], ranks.train[val_rows],
                             10, scope=sc.val_scope)
    for name, embed in methods.items():
        with torch.no_grad():
            rank = rank_all(embed(raw["query_test"]), embed(raw["items"]))
            cells = [map_at_ks(rank[m], ranks.test[m], [10])["mAP@10"] if m.any() else np.nan
                     for m in (types["ordinary"], types["planted"])]
            for mask in (~planted_val, planted_val):
                cells.append(val.evaluate(embed, mask)[0] if mask.any() else np.nan)
        rec = known_answer_recall(cfg, pipe.dir("world"), pipe.dir("queries"), rank)
        recall = "  ".join(f"{k.split()[0]} {v:.2f} ± {rec[k + '_stderr']:.2f}"
                           for k, v in rec.items() if not k.endswith("_stderr"))
        print(f"{name:42s} " + " ".join(f"{c:9.3f}" for c in cells) + f"  {recall}")


if __name__ == "__main__":
    main()
