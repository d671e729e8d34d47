"""How far the teacher's rankings can be trusted: its agreement with itself, its curation recall.

* **Self-agreement (the ceiling).**  The test queries are scored again with independent noise:
  the scoring seed is ``seed + ceiling.seed_offset``, so the query's (t, ε) draws for the
  unlearning step and the items' scoring noise are all fresh.  ``teacher.self_mAP@k`` is the mAP
  of this replicate's full-set ranking against the teacher's own top-k, exactly as every method
  is scored.  A student cannot be expected to agree with the teacher better than the teacher
  agrees with itself; a method within a standard error of it has matched the teacher.
* **Curation recall.**  Stage 1 keeps K neighbours per training query and the teacher ranks only
  those.  A sample of training queries is scored over the whole training set with the teacher's
  own noise (the same draws, so inside the K-set the scores equal the teacher's); the share of
  the full-set top-k inside the K-set is ``teacher.curation_recall@k``.

Each query's influences are one file (``replicate_test_<i>.npy`` / ``fullset_train_<i>.npy``),
checked when read: a killed run resumes at the next query.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from attribution.callbacks import map_at_ks, map_by_type
from attribution.common.devices import accelerator_for, torch_device
from attribution.common.files import DataFileError, atomic_save_npy, atomic_write_bytes, load_npy
from attribution.config import derive
from attribution.metrics import standard_error
from attribution.teacher import curation
from attribution.teacher.module import QueryDataset, TeacherModule, collate_one
from attribution.teacher.run import (
    build_scorer,
    distributed,
    make_queries,
    scorer_base_losses,
    teacher_strategy,
    test_queries,
)
from attribution.teacher.scorer import Query

PARTIAL = "delete it; rerunning recomputes only this query"


def query_scores(scorer, queries: list[Query], out: Path, stem: str, n_items: int,
                 progress: bool, cfg=None, base_dir: Path | None = None
                 ) -> tuple[np.ndarray, int]:
    """(float (Q, N) influences, how many were scored now): one cached file per query
    (``<stem>_<query id>.npy``, checked when read), so a killed run resumes at the next.
    With ``cfg`` whose teacher runs on several devices, the queries not yet scored are spread
    over its ranks first (:func:`score_over_ranks`; base losses cached in ``base_dir``)."""
    todo = [q for q in queries if not (out / f"{stem}_{q.query_id}.npy").is_file()]
    spread = bool(todo) and cfg is not None and teacher_ranks(cfg) > 1
    if spread:
        score_over_ranks(cfg, scorer, todo, out, stem, base_dir or out)
    rows, fresh = [], len(todo) if spread else 0
    for i, q in enumerate(queries):
        path = out / f"{stem}_{q.query_id}.npy"
        if path.is_file():
            row = load_npy(path, "A ceiling query's influences", rebuild=PARTIAL)
            if row.shape != (n_items,) or not np.isfinite(row).all():
                raise DataFileError(f"{path} holds {row.dtype} {row.shape}, expected {n_items} "
                                    f"finite influences: {PARTIAL}")
        else:
            row = scorer.score(q)["influence"].detach().cpu().numpy().astype(np.float32)
            atomic_save_npy(path, row)
            fresh += 1
        if progress:
            print(f"  {out.name.split('-')[0]} {stem} {i + 1}/{len(queries)}", flush=True)
        rows.append(row)
    return (np.stack(rows) if rows else np.zeros((0, n_items), np.float32)), fresh


def teacher_ranks(cfg) -> int:
    return cfg.teacher.devices * cfg.teacher.num_nodes


def rescoring_scorer(cfg, world_dir: Path, text_dir: Path, gen_dir: Path, fisher_dir: Path,
                     base_dir: Path):
    """(scorer, candidates) for a stage that rescores queries over every item: on
    ``cfg.device`` with its base losses now for one process; over several ranks the base
    losses wait for the ranks, which split them (cached in ``base_dir``)."""
    one = teacher_ranks(cfg) == 1
    return build_scorer(cfg, world_dir, text_dir, gen_dir, fisher_dir, base_dir,
                        device=torch_device(cfg.device) if one else "cpu", eager_base=one)


class RowWriter(BasePredictionWriter):
    """Saves each rescored query's influences as ``<stem>_<query id>.npy`` as soon as done."""

    def __init__(self, out: Path, stem: str):
        super().__init__(write_interval="batch")
        self.out, self.stem = out, stem

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx=0) -> None:
        row = prediction["influence"].detach().cpu().numpy().astype(np.float32)
        atomic_save_npy(self.out / f"{self.stem}_{batch.query_id}.npy", row)


def score_over_ranks(cfg, scorer, queries: list[Query], out: Path, stem: str,
                     base_dir: Path) -> None:
    """Rescore ``queries`` over the teacher's devices as the teacher stage does (Lightning
    predict, ``teacher.strategy`` with its process-group timeout), one file per query; the
    scorer's base losses, when it has none, split over the ranks."""
    tc = cfg.teacher
    trainer = L.Trainer(accelerator=accelerator_for(cfg.device), devices=tc.devices,
                        num_nodes=tc.num_nodes, strategy=teacher_strategy(tc), logger=False,
                        enable_progress_bar=False, inference_mode=False,
                        enable_model_summary=False, callbacks=[RowWriter(out, stem)])
    loader = DataLoader(QueryDataset(queries), batch_size=1, collate_fn=collate_one)
    module = TeacherModule(scorer, functools.partial(scorer_base_losses, cfg, base_dir))
    trainer.predict(module, loader, return_predictions=False)
    if trainer.world_size > 1 and distributed():  # torchrun / SLURM: every rank reads on
        trainer.strategy.barrier(f"{stem} rows written")


def stratified_rows(types: dict[str, np.ndarray] | None, n_queries: int, n_sample: int,
                    seed: int) -> np.ndarray:
    """int (n_sample,) sorted test-query rows: each query type (boolean masks over the
    ``n_queries`` rows) gets its share of the sample, rounded by largest remainder and at least
    one row, drawn at random within the type; all rows when ``n_sample`` >= ``n_queries``.
    Without types, a uniform random sample."""
    if n_sample >= n_queries:
        return np.arange(n_queries)
    masks = [m for m in (types or {}).values() if m.any()] or [np.ones(n_queries, bool)]
    sizes = np.array([m.sum() for m in masks])
    quota = n_sample * sizes / sizes.sum()
    take = np.maximum(1, np.floor(quota).astype(int))
    for i in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if take.sum() >= n_sample:
            break
        take[i] += 1
    while take.sum() > n_sample:  # the minimum of one row per type overshot
        take[int(np.argmax(take))] -= 1
    rng = np.random.default_rng([int(seed), 89])
    rows = [rng.permutation(np.flatnonzero(m))[: min(t, m.sum())] for m, t in zip(masks, take)]
    return np.sort(np.concatenate(rows))


def replicate_ranks(out: Path, rows) -> np.ndarray:
    """int (len(rows), N): the stored fresh-noise replicate's ranking of those test queries."""
    rep = np.stack([load_npy(out / f"replicate_test_{i}.npy", "A ceiling query's influences",
                             rebuild=PARTIAL) for i in rows])
    return np.argsort(-rep, axis=1, kind="stable")


def self_agreement(out: Path, teacher_rank: np.ndarray, ks: list[int], rows,
                   types: dict[str, np.ndarray] | None = None) -> dict:
    """``self_mAP@k`` (+ ``_stderr``) of the stored replicate of the test queries ``rows``
    against the teacher's ranking, at any k (read when metrics are written, so changing
    ``student.k_eval`` never rescores).  With ``types`` (boolean masks over every test query)
    also ``self.<type>.mAP@k`` on each type's sampled queries, and the overall figure is
    weighted as the test set is (Σ_t n_t/n · mean_t, s.e. from the types' s.e.), so it bounds
    the methods on their own query mix whatever share of each type was rescored.  ``rows``
    may be a count (the first rows, as ceilings made before stratified samples stored)."""
    rows = np.arange(rows) if np.isscalar(rows) else np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return {}
    ks = [k for k in ks if k <= teacher_rank.shape[1]]
    rep, teacher = replicate_ranks(out, rows), teacher_rank[rows]
    sampled = {t: m[rows] for t, m in (types or {}).items() if m[rows].any()}
    by_type = map_by_type(rep, teacher, ks, sampled)
    agreement = {f"self_{k}": v for k, v in map_at_ks(rep, teacher, ks).items()}
    if sampled and all(m.any() == m[rows].any() for m in (types or {}).values()):
        n = len(teacher_rank)
        for k in ks:
            w = {t: types[t].sum() / n for t in sampled}
            agreement[f"self_mAP@{k}"] = float(sum(w[t] * by_type[f"{t}.mAP@{k}"] for t in w))
            agreement[f"self_mAP@{k}_stderr"] = float(np.sqrt(sum(
                (w[t] * by_type[f"{t}.mAP@{k}_stderr"]) ** 2 for t in w)))
    agreement.update({f"self.{k}": v for k, v in by_type.items()})
    return agreement


def curation_recall(full_scores: np.ndarray, ksets: np.ndarray, ks: list[int]) -> dict:
    """Share of each query's full-set top-k (by ``full_scores``, (Q, N)) inside its K-set
    (``ksets``, (Q, K) ids): mean and standard error over queries, per k."""
    out = {}
    order = np.argsort(-full_scores, axis=1, kind="stable")
    for k in ks:
        shares = [len(set(o[:k].tolist()) & set(s.tolist())) / k for o, s in zip(order, ksets)]
        out[f"curation_recall@{k}"] = float(np.mean(shares)) if shares else float("nan")
        out[f"curation_recall@{k}_stderr"] = standard_error(shares)
    return out


def run_ceiling(cfg, world_dir: Path, text_dir: Path, gen_dir: Path, queries_dir: Path,
                fisher_dir: Path, teacher_dir: Path, out: Path, progress: bool = True,
                types: dict[str, np.ndarray] | None = None) -> dict:
    """Score the replicate and the full-set training sample; write ``ceiling.json``.

    ``types``: boolean masks over the test queries (ordinary / planted); a sample of them
    (``ceiling.test_queries``) is stratified by them (:func:`stratified_rows`)."""
    cc = cfg.ceiling
    out.mkdir(parents=True, exist_ok=True)
    with np.load(teacher_dir / "teacher_test.npz") as merged:
        teacher_rank = merged["rank"]
    n_items = teacher_rank.shape[1]
    summary: dict = {}
    n_test = min(cc.test_queries or len(teacher_rank), len(teacher_rank))
    if n_test:
        fresh = derive(cfg, {"seed": cfg.seed + cc.seed_offset})  # new draws and item noise
        scorer, cands = rescoring_scorer(fresh, world_dir, text_dir, gen_dir, fisher_dir, out)
        rows = stratified_rows(types, len(teacher_rank), n_test, cfg.seed)
        test = test_queries(queries_dir, cands)
        query_scores(scorer, [test[i] for i in rows], out, "replicate_test", n_items,
                     progress, fresh)
        summary["self_queries"] = n_test
        summary["self_rows"] = rows.tolist()
        summary.update(self_agreement(out, teacher_rank, [10], rows, types))
        del scorer
    ksets = np.load(teacher_dir / "candidates_train.npy")
    n_train = min(cc.curation_queries, len(ksets))
    if n_train:
        # the teacher's own noise and base losses (its cached base_losses.npy is reused)
        scorer, cands = rescoring_scorer(cfg, world_dir, text_dir, gen_dir, fisher_dir,
                                         teacher_dir)
        train = [q for q in make_queries(cfg, queries_dir, cands, teacher_dir)
                 if q.split == "train"][:n_train]
        full = [Query(q.split, q.query_id, q.z, q.cond, torch.arange(len(cands))) for q in train]
        scores = query_scores(scorer, full, out, "fullset_train", n_items, progress, cfg,
                              teacher_dir)[0]
        summary.update(curation_recall(scores, ksets[:n_train],
                                       [k for k in (10, 50, 100) if k <= ksets.shape[1]]))
        summary["curation_queries"] = n_train
        by_space = curation_alternatives(cands, train, scores, cfg.teacher.k)
        atomic_write_bytes(out / "curation.json", json.dumps(by_space, indent=2).encode())
    atomic_write_bytes(out / "ceiling.json", json.dumps(summary, indent=2).encode())
    return summary


def curation_alternatives(cands, train: list[Query], scores: np.ndarray, k_cfg: int,
                          k: int = 10) -> list[dict]:
    """Curation recall@k of every stage-1 space at K, 2K and 4K (within N), from the same
    full-set scores (they do not depend on the curation): the evidence for choosing
    ``teacher.curation`` and ``teacher.k`` on training queries."""
    n = scores.shape[1]
    rows = []
    for space in curation.SPACES:
        items = np.concatenate([curation.stage1_features(space, z, cond)
                                for _, z, cond in cands.chunks()])
        qf = np.concatenate([curation.stage1_features(space, q.z[None], q.cond[None])
                             for q in train])
        for big_k in sorted({min(k_cfg * f, n) for f in (1, 2, 4)}):
            r = curation_recall(scores, curation.nearest_items(items, qf, big_k), [k])
            rows.append({"space": space, "K": big_k, f"recall@{k}": r[f"curation_recall@{k}"],
                         f"recall@{k}_stderr": r[f"curation_recall@{k}_stderr"]})
    return rows
