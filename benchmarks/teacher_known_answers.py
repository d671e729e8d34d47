"""Known-answer check of a teacher: score only the test queries that prompt a planted concept
and print recall@10 and MRR of the planted training images against chance.

Usage:  python benchmarks/teacher_known_answers.py [CONFIG] [key=value ...]
e.g.    python benchmarks/teacher_known_answers.py configs/experiment/toy.yaml teacher.fisher=diagonal

Reuses the pipeline's cached world, generator, queries and Fisher for CONFIG (building the ones
that are missing); writes nothing into the teacher's shards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from attribution.config import load_config, planted_for, to_dict
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.pipeline import Pipeline
from attribution.teacher.evaluate import format_known_answers, planted_known_answers
from attribution.teacher.run import build_scorer, make_queries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/experiment/toy_smoke.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    pipe.run(["fisher", "queries"])
    world = CaptionedImageSet(pipe.dir("world"))
    test = QuerySet(pipe.dir("queries") / "query_test")
    planted = [to_dict(p) for p in planted_for(cfg.world, "test")]
    wanted = [i for i, a in enumerate(test.attributes)
              if any(a[p["attribute"]] == p["value"] for p in planted)]
    with tempfile.TemporaryDirectory() as tmp:
        scorer, cands = build_scorer(cfg, pipe.dir("world"), pipe.dir("text"),
                                     pipe.dir("generator"), pipe.dir("fisher"), Path(tmp))
        queries = {q.query_id: q for q in make_queries(cfg, pipe.dir("queries"), cands, Path(tmp))
                   if q.split == "test"}
        ranks, start, ups = [], time.time(), []
        for i in wanted:
            r = scorer.score(queries[i])
            ranks.append(np.argsort(-r["influence"].numpy(), kind="stable"))
            ups.append(r["query_loss_after"] - r["query_loss_before"])
    known = planted_known_answers(world.attributes, [test.attributes[i] for i in wanted],
                                  np.stack(ranks), planted)
    print(f"teacher: {cfg.teacher.fisher} Fisher, params={cfg.teacher.params}, "
          f"eta={cfg.teacher.eta}, timesteps={list(cfg.teacher.timesteps)}, N={len(world)}")
    print(f"{len(wanted)} planted test queries, {(time.time() - start) / len(wanted):.1f} s/query, "
          f"mean query-loss increase {np.mean(ups):.4f}")
    print(format_known_answers(known))


if __name__ == "__main__":
    main()
