"""Stages ``fisher`` (once per generator), ``teacher`` (AbU / AbU+ on every query, resumable
per query; known answers on planted concepts) and ``ceiling`` (the teacher against itself under
fresh noise, and its stage-1 curation recall)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attribution.common.files import Dirs, atomic_write_bytes
from attribution.config import planted_for, to_dict
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.teacher.ceiling import run_ceiling as ceiling_run
from attribution.teacher.evaluate import planted_known_answers, planted_mask
from attribution.teacher.run import fit_fisher
from attribution.teacher.run import run_teacher as score_queries
from attribution.teacher.second import run_second_teacher as second_run


def run_fisher(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Fit the configured Fisher on the world's items under the trained generator."""
    return fit_fisher(cfg, inputs["world"], inputs["text"], inputs["generator"], out, progress)


def run_teacher(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Score every query (training queries over their stage-1 K-set, test queries over the whole
    set), merge into the released layout, and check the planted concepts' known answers."""
    summary = score_queries(cfg, inputs["world"], inputs["text"], inputs["generator"],
                            inputs["queries"], inputs["fisher"], out, progress)
    if cfg.world.kind == "encoded":  # no attributes, so no planted known answers
        return summary
    test = QuerySet(inputs["queries"] / "query_test")
    with np.load(out / "teacher_test.npz") as merged:  # written by run_teacher's merge
        rank = merged["rank"]
    known = planted_known_answers(CaptionedImageSet(inputs["world"]).attributes,
                                  test.attributes, rank,
                                  [to_dict(p) for p in planted_for(cfg.world, "test")])
    atomic_write_bytes(out / "known_answers.json", json.dumps(known, indent=2).encode())
    summary["known_answers"] = known
    for name, r in known.items():
        summary[f"{name} recall@10"] = r["recall@10"]
        summary[f"{name} mrr"] = r["mrr"]
    return summary


def run_ceiling(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """The teacher's replicate on the test queries (a sample stratified by query type) and
    its full-set training sample."""
    return ceiling_run(cfg, inputs["world"], inputs["text"], inputs["generator"],
                       inputs["queries"], inputs["fisher"], inputs["teacher"], out, progress,
                       test_query_types(cfg, inputs["queries"]))


def test_query_types(cfg, queries_dir: Path) -> dict[str, np.ndarray]:
    """Boolean masks over the test queries: ``planted`` (the prompt names a planted test
    concept) and ``ordinary`` (all others); {} without planted concepts or query attributes
    (an encoded or folder world)."""
    planted = planted_for(cfg.world, "test")
    if not planted:
        return {}
    attrs = QuerySet(Path(queries_dir) / "query_test").attributes
    if attrs is None:
        return {}
    mask = planted_mask(attrs, [to_dict(p) for p in planted])
    return {"ordinary": ~mask, "planted": mask}


def run_second_teacher(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """A second teacher (``second_teacher``, by default the published AbU+ step) ranks the test
    queries over the whole training set."""
    return second_run(cfg, inputs["world"], inputs["text"], inputs["generator"],
                      inputs["queries"], inputs["fisher"], out, progress)
