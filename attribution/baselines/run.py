"""The ``baselines`` stage: every other attribution method on the student's test queries.

Each method ranks the whole training set for every test query; quality is mAP@k against the
teacher's ranking (the same harness and queries as the student), plus recall of the planted
known answers; cost is queries/s for one query at a time, and storage what the method keeps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attribution.callbacks import map_at_ks, rank_all
from attribution.common.files import DataFileError, atomic_save_npy, atomic_write_bytes, load_npy
from attribution.config import derive, to_dict
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.teacher.evaluate import planted_known_answers


def known_answer_recall(pipe, rank: np.ndarray) -> dict:
    """{'<attr>=<value> recall@10': ...} of the planted concepts' test queries for a ranking."""
    world = CaptionedImageSet(pipe.dir("world"), verify=False)
    test = QuerySet(pipe.dir("queries") / "query_test")
    known = planted_known_answers(world.attributes, test.attributes, rank,
                                  [to_dict(p) for p in pipe.cfg.world.planted])
    return {f"{name} recall@10": r["recall@10"] for name, r in known.items()}


def query_types(pipe) -> dict[str, np.ndarray]:
    """Boolean masks over the test queries: ``planted`` (the prompt names a planted concept,
    whose known answers the teacher finds) and ``ordinary`` (all others); {} without planted
    concepts or query attributes."""
    planted = pipe.cfg.world.planted
    attrs = QuerySet(pipe.dir("queries") / "query_test").attributes
    if not planted or attrs is None:
        return {}
    mask = np.array([any(a.get(p.attribute) == p.value for p in planted) for a in attrs])
    return {"ordinary": ~mask, "planted": mask}


def map_by_type(rank: np.ndarray, teacher_rank: np.ndarray, ks: list[int],
                types: dict[str, np.ndarray]) -> dict[str, float]:
    """``{"<type>.mAP@k": ..., "<type>.mAP@k_stderr": ...}`` over each type's test queries."""
    out = {}
    for name, mask in types.items():
        if mask.any():
            out.update({f"{name}.{k}": v
                        for k, v in map_at_ks(rank[mask], teacher_rank[mask], ks).items()})
    return out


def run_baselines(pipe, out: Path, progress: bool = True) -> dict:
    """Write ``baselines.json`` ({method: {mAP@k, mAP@k_stderr, queries_per_second,
    storage_bytes, <planted> recall@10}}) and each method's test rankings ``rank_<method>.npy``
    (int32 (Q_test, N), most influential first); return a summary."""
    from attribution.attribute import feature_search_throughput
    from attribution.features.cache import load_features
    from attribution.student.train import space_dir

    cfg, bc = pipe.cfg, pipe.cfg.baselines
    with np.load(pipe.dir("teacher") / "teacher_test.npz") as merged:
        teacher_rank = merged["rank"]
    n_items = teacher_rank.shape[1]
    ks = [k for k in cfg.student.k_eval if k <= n_items]
    results: dict[str, dict] = {}
    if bc.features:
        for space in cfg.features.spaces:
            feats = load_features(space_dir(pipe.dir("features"), space))
            rank = rank_all(F.normalize(torch.as_tensor(np.asarray(feats["query_test"])), dim=-1),
                            F.normalize(torch.as_tensor(np.asarray(feats["items"])), dim=-1))
            results[space] = {**map_at_ks(rank, teacher_rank, ks),
                              **known_answer_recall(pipe, rank),
                              **feature_search_throughput(pipe, space)}
            atomic_save_npy(out / f"rank_{space}.npy", rank.astype(np.int32))
    if bc.dtrak:
        results["dtrak"] = _dtrak(pipe, out, teacher_rank, ks, progress)
    if bc.abu_diagonal:
        results["abu_diagonal"] = _abu_diagonal(pipe, teacher_rank, ks)
    atomic_write_bytes(out / "baselines.json", json.dumps(results, indent=2).encode())
    k0 = ks[0]
    return {f"{m} mAP@{k0}": r[f"mAP@{k0}"] for m, r in results.items()}


def _dtrak(pipe, out: Path, teacher_rank: np.ndarray, ks: list[int], progress: bool) -> dict:
    from attribution.baselines.dtrak import DTRAK, DTRAKSettings
    from attribution.teacher.run import load_world_model

    cfg, bc = pipe.cfg, pipe.cfg.baselines
    unet, _, alphas, cands = load_world_model(cfg, pipe.dir("world"), pipe.dir("text"),
                                              pipe.dir("generator"))
    dt = DTRAK(unet, alphas, DTRAKSettings(bc.dtrak_params, tuple(bc.dtrak_timesteps),
                                           bc.dtrak_proj_dim, bc.dtrak_damping,
                                           bc.dtrak_batch_size, cfg.seed))
    cache = out / "dtrak_train_features.npy"  # the expensive, query-independent part
    if cache.is_file():  # written by this unfinished stage: its shape is all we can check
        phi = torch.from_numpy(load_npy(cache, "D-TRAK feature cache", rebuild=(
            "delete it; rerunning the baselines recomputes it")))
        if phi.shape[0] != len(cands) or not torch.isfinite(phi).all():
            raise DataFileError(f"D-TRAK feature cache {cache} has {phi.shape[0]} rows (or "
                                f"non-finite values), expected {len(cands)}: delete it; "
                                "rerunning the baselines recomputes it")
    else:
        phi = dt.featurize_all(cands.view(torch.arange(len(cands))),
                               cands.table.lookup(cands.rows[:, 0]), 0, progress)
        atomic_save_npy(cache, phi.numpy())
    dt.fit(phi)
    qs = QuerySet(pipe.dir("queries") / "query_test", need_embeddings=True)
    zq = torch.from_numpy(np.asarray(qs.latents)).float()
    cq = torch.from_numpy(np.asarray(qs.text_embeddings)).float()
    scores = dt.scores(dt.featurize_all(zq, cq, 1))
    rank = np.argsort(-scores.numpy(), axis=1, kind="stable")
    atomic_save_npy(out / "rank_dtrak.npy", rank.astype(np.int32))
    weights = sum(p.numel() for p in unet.parameters()) * 4
    return {**map_at_ks(rank, teacher_rank, ks), **known_answer_recall(pipe, rank),
            "queries_per_second": 1.0 / dt.seconds_per_query(zq, cq),
            "storage_bytes": int(phi.numel()) * 4 + weights}


def _abu_diagonal(pipe, teacher_rank: np.ndarray, ks: list[int]) -> dict:
    from attribution.pipeline import Pipeline

    sub = Pipeline(derive(pipe.cfg, {"teacher": {"fisher": "diagonal"}}), pipe.progress,
                   pipe.echo)
    res = sub.run(["teacher"])["teacher"]
    with np.load(sub.dir("teacher") / "teacher_test.npz") as merged:
        rank = merged["rank"]
    atomic_save_npy(pipe.dir("baselines") / "rank_abu_diagonal.npy", rank.astype(np.int32))
    return {**map_at_ks(rank, teacher_rank, ks), **known_answer_recall(pipe, rank),
            "queries_per_second": 1.0 / res.summary["seconds_per_test_query"],
            "storage_bytes": sub.teacher_storage_bytes()}
