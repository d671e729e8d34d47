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

from attribution.baselines.dtrak import DTRAK
from attribution.callbacks import map_at_ks, rank_all
from attribution.common.files import (
    DataFileError,
    Dirs,
    atomic_save_npy,
    atomic_write_bytes,
    load_npy,
    read_json,
)
from attribution.data.queries import QuerySet
from attribution.evaluation import known_answer_recall
from attribution.features.cache import load_features, space_dir
from attribution.student.deploy import feature_search_throughput
from attribution.teacher.evaluate import teacher_storage_bytes
from attribution.teacher.run import load_world_model


def run_baselines(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Write ``baselines.json`` ({method: {mAP@k, mAP@k_stderr, queries_per_second,
    storage_bytes, <planted> recall@10}}) and each method's test rankings ``rank_<method>.npy``
    (int32 (Q_test, N), most influential first); return a summary.

    ``inputs``: the folders of the world, text, generator, queries, toyclip, features and teacher
    stages; with ``baselines.abu_diagonal`` also ``abu_diagonal`` and ``abu_diagonal_fisher``, the
    finished teacher and Fisher of the same config with ``teacher.fisher=diagonal``."""
    bc = cfg.baselines

    def recall(rank):
        return known_answer_recall(cfg, inputs["world"], inputs["queries"], rank)

    with np.load(inputs["teacher"] / "teacher_test.npz") as merged:
        teacher_rank = merged["rank"]
    n_items = teacher_rank.shape[1]
    ks = [k for k in cfg.student.k_eval if k <= n_items]
    results: dict[str, dict] = {}
    if bc.features:
        for space in cfg.features.spaces:
            feats = load_features(space_dir(inputs["features"], space))
            rank = rank_all(F.normalize(torch.as_tensor(np.asarray(feats["query_test"])), dim=-1),
                            F.normalize(torch.as_tensor(np.asarray(feats["items"])), dim=-1))
            results[space] = {**map_at_ks(rank, teacher_rank, ks),
                              **recall(rank), **feature_search_throughput(cfg, inputs, space)}
            atomic_save_npy(out / f"rank_{space}.npy", rank.astype(np.int32))
    if bc.dtrak:
        results["dtrak"] = _dtrak(cfg, inputs, out, teacher_rank, ks, progress)
    if bc.abu_diagonal:
        results["abu_diagonal"] = _abu_diagonal(cfg, inputs, out, teacher_rank, ks)
    atomic_write_bytes(out / "baselines.json", json.dumps(results, indent=2).encode())
    k0 = ks[0]
    return {f"{m} mAP@{k0}": r[f"mAP@{k0}"] for m, r in results.items()}


def _dtrak(cfg, inputs: Dirs, out: Path, teacher_rank: np.ndarray, ks: list[int],
           progress: bool) -> dict:
    bc = cfg.baselines
    unet, _, alphas, cands = load_world_model(cfg, inputs["world"], inputs["text"],
                                              inputs["generator"])
    dt = DTRAK(unet, alphas, bc, cfg.seed)
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
    qs = QuerySet(inputs["queries"] / "query_test", need_embeddings=True)
    zq = torch.from_numpy(np.asarray(qs.latents)).float()
    cq = torch.from_numpy(np.asarray(qs.text_embeddings)).float()
    scores = dt.scores(dt.featurize_all(zq, cq, 1))
    rank = np.argsort(-scores.numpy(), axis=1, kind="stable")
    atomic_save_npy(out / "rank_dtrak.npy", rank.astype(np.int32))
    weights = sum(p.numel() for p in unet.parameters()) * 4
    return {**map_at_ks(rank, teacher_rank, ks),
            **known_answer_recall(cfg, inputs["world"], inputs["queries"], rank),
            "queries_per_second": 1.0 / dt.seconds_per_query(zq, cq),
            "storage_bytes": int(phi.numel()) * 4 + weights}


def _abu_diagonal(cfg, inputs: Dirs, out: Path, teacher_rank: np.ndarray,
                  ks: list[int]) -> dict:
    """AbU with a diagonal Fisher: the teacher stage of the same config with
    ``teacher.fisher=diagonal``, run (and verified) by the caller."""
    diag = inputs["abu_diagonal"]
    summary = read_json(diag / "stage.json", "The diagonal teacher's completion record")["summary"]
    with np.load(diag / "teacher_test.npz") as merged:
        rank = merged["rank"]
    atomic_save_npy(out / "rank_abu_diagonal.npy", rank.astype(np.int32))
    return {**map_at_ks(rank, teacher_rank, ks),
            **known_answer_recall(cfg, inputs["world"], inputs["queries"], rank),
            "queries_per_second": 1.0 / summary["seconds_per_test_query"],
            "storage_bytes": teacher_storage_bytes(inputs["world"], inputs["generator"],
                                                   inputs["abu_diagonal_fisher"])}
