"""A step-free teacher variant: the Gauss–Newton curvature of each item's loss along the query's
unlearning direction (``attribution study teacher-curvature CONFIG``; docs/results.md "The teacher").

The even part of AbU's loss change (``studies/teacher_steps.py``, ``--even``) is
½η²·dᵀ∇²L_j·d + O(η⁴), with d = P⁻¹g_q the natural-gradient direction.  Its Gauss–Newton part is
how far item j's noise predictions move along d:

    GN_j = mean over j's (caption, t) samples of mean(a²),  a = J_j·d,

which has no step at all — only the direction.  J·d is taken by a central difference of the
generator's predictions at θ0 ± s·η·d (``teacher/predictions.py``: no float32 cancellation of
two losses, which sinks the even part at small steps); ``exact_prediction_jvp`` gives the
exact forward-mode product for the known-answer check.  The ranking is by GN_j, largest first,
over every candidate of the query (a training query of the ``val`` split: every item), stored
per query beside the step study's files (``<study>/gn/<split>_<qid>.npy``); the
counterfactual reads it as ``teacher-gn``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from attribution.common.files import Dirs, atomic_save_npy, atomic_write_bytes
from attribution.config import planted_for, to_dict
from attribution.counterfactual.study_files import gn_file, gn_ranks
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet, study_query_set
from attribution.studies.teacher_steps import study_rows
from attribution.teacher.evaluate import planted_known_answers
from attribution.teacher.predictions import DIFFERENCE_FACTOR, Batch, iter_samples
from attribution.teacher.run import teacher_scorer
from attribution.teacher.scorer import AbUScorer, Query


def exact_prediction_jvp(unet: nn.Module, params: dict[str, nn.Parameter],
                         d: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """The exact J·d on one batch by forward-mode AD (``torch.func.jvp``), on a copy of the
    generator with the classic attention processor: SDPA's CPU kernel has no forward-mode
    derivative.  For known-answer checks of ``predictions.central_jd``."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.func import functional_call, jvp

    net = copy.deepcopy(unet)
    net.set_attn_processor(AttnProcessor())
    names = list(params)
    base = tuple(params[n].detach() for n in names)
    x, t, c = batch

    def f(*ps):
        return functional_call(net, dict(zip(names, ps)), (x, t, c)).sample.float()

    with torch.no_grad():
        return jvp(f, base, tuple(d[n].to(b.dtype) for n, b in zip(names, base)))[1].cpu()


def gauss_newton(scorer: AbUScorer, q: Query, factor: float = DIFFERENCE_FACTOR,
                 samples: list[tuple[Batch, torch.Tensor]] | None = None) -> torch.Tensor:
    """GN_j (K,) for every candidate of ``q``: mean ‖J_j·d‖² along the query's unlearning
    direction (max over views), J·d by a central difference at ``factor`` × the teacher's η.
    ``samples``: ``q.candidates``' sample inputs when already built (``iter_samples``; the
    same for every full-set query)."""
    _, _, _, curve = scorer.quadratic_terms(q, samples, factor)
    return curve.max(1).values






def run_curvature(cfg, dirs: Dirs, study: Path, split: str = "test",
                  n_queries: int | None = None, progress: bool = True) -> dict:
    """Score the step study's queries of ``split`` by GN (cached per query; a killed run
    resumes), write ``gn[_val].json`` in ``study``: planted recall@10 and seconds a query."""
    rows = study_rows(cfg, dirs, split, n_queries)
    if not rows:
        raise ValueError(f"the {split} split has no queries to score")
    world = CaptionedImageSet(dirs["world"], verify=False)
    n = len(world)
    scorer = queries = everything = None  # val: every query's candidates are all n items,
    seconds = []  # so their sample inputs are built once
    for qid in tqdm(rows, desc=f"curvature ({split})", disable=not progress):
        path = gn_file(study, qid, split)
        if path.is_file():
            continue
        if scorer is None:
            scorer, _, found = teacher_scorer(cfg, dirs, study_query_set(split))
            queries = {q.query_id: q for q in found}
        q = queries[qid]
        start = time.time()
        if split == "val":  # a training query, scored over every item (not its K-set)
            q = Query(q.split, q.query_id, q.z, q.cond, torch.arange(n))
            if everything is None:
                everything = list(iter_samples(scorer.cands, scorer.alphas, q.candidates,
                                               scorer.tc, scorer.seed, scorer.device))
        with torch.no_grad():
            gn = gauss_newton(scorer, q, samples=everything)
        seconds.append(time.time() - start)
        path.parent.mkdir(parents=True, exist_ok=True)  # the record first: a row needs both
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(
            {"seconds": seconds[-1], "difference_factor": DIFFERENCE_FACTOR}).encode())
        atomic_save_npy(path, gn.numpy().astype(np.float32))
    ranks = gn_ranks(study, max(rows) + 1, n, split)[rows]
    attrs = QuerySet(dirs["queries"] / f"query_{study_query_set(split)}").attributes
    known = planted_known_answers(
        world.attributes, [attrs[i] for i in rows] if attrs else [], ranks,
        [to_dict(p) for p in planted_for(cfg.world, "test" if split == "test" else "val")])
    summary = {"split": split, "rows_scored": rows, "difference_factor": DIFFERENCE_FACTOR,
               "seconds_per_query": float(np.mean(seconds)) if seconds else None,
               **{f"{name} recall@10": r["recall@10"] for name, r in known.items()}}
    name = "gn.json" if split == "test" else f"gn_{split}.json"
    atomic_write_bytes(Path(study) / name, json.dumps(summary, indent=2).encode())
    return summary
