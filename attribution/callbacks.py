"""Callbacks: ranking mAP on held-out queries, and attribution throughput.  They only gather
embeddings and call the pure functions of :mod:`attribution.metrics` / :mod:`attribution.retrieval`.
"""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from attribution import retrieval
from attribution.metrics import mean_average_precision


def rank_all(query_emb: torch.Tensor, item_emb: torch.Tensor) -> np.ndarray:
    """Full rankings int (Q, N) by inner product, best first (ties broken by id)."""
    scores = (query_emb @ item_emb.T).numpy()
    return np.argsort(-scores, axis=1, kind="stable")


def map_at_ks(rankings: np.ndarray, teacher_rank: np.ndarray, ks: list[int]) -> dict[str, float]:
    """mAP@k: positives = the teacher's full-set top-k of each query; the whole set is ranked."""
    out = {}
    for k in ks:
        m, se = mean_average_precision(list(rankings), [set(r[:k].tolist()) for r in teacher_rank])
        out[f"mAP@{k}"], out[f"mAP@{k}_stderr"] = m, se
    return out


def feature_baseline(item_feats, query_feats, teacher_rank, ks) -> dict[str, float]:
    """mAP of the untuned features: cosine similarity in the raw feature space."""
    qi = F.normalize(torch.as_tensor(np.asarray(query_feats), dtype=torch.float32), dim=-1)
    ii = F.normalize(torch.as_tensor(np.asarray(item_feats), dtype=torch.float32), dim=-1)
    return map_at_ks(rank_all(qi, ii), teacher_rank, ks)


class RankingMAPCallback(L.Callback):
    """Logs ``val/mAP@k`` (+ ``_stderr``) for held-out queries after every training epoch, and
    ``val/baseline_mAP@k`` (untuned features, same queries) once at the start."""

    def __init__(self, item_feats, query_feats, teacher_rank: np.ndarray, ks: list[int]):
        self.item_feats, self.query_feats, self.rank, self.ks = (item_feats, query_feats,
                                                                 teacher_rank, list(ks))
        self.last: dict[str, float] = {}
        self.baseline: dict[str, float] = {}

    def evaluate(self, module) -> dict[str, float]:
        return map_at_ks(rank_all(module.embed(self.query_feats), module.embed(self.item_feats)),
                         self.rank, self.ks)

    def on_fit_start(self, trainer, module) -> None:
        self.baseline = feature_baseline(self.item_feats, self.query_feats, self.rank, self.ks)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.last = self.evaluate(module)
        for key, v in self.last.items():
            module.log(f"val/{key}", v, prog_bar=key == f"mAP@{self.ks[0]}")
        for key, v in self.baseline.items():
            module.log(f"val/baseline_{key}", v)


class ThroughputCallback(L.Callback):
    """After training: queries/s for head + search (per single query, after warm-up) and for
    the search alone, over an exact index of every embedded training item."""

    def __init__(self, item_feats, query_feats, k: int = 10, n_queries: int = 50,
                 warmup: int = 5):
        self.item_feats, self.query_feats = item_feats, query_feats
        self.k, self.n, self.warmup = k, n_queries, warmup
        self.results: dict[str, float] = {}

    @staticmethod
    def _sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_fit_end(self, trainer, module) -> None:
        index = retrieval.build_index(module.embed(self.item_feats).numpy())
        feats = torch.as_tensor(np.asarray(self.query_feats[: self.n]), dtype=torch.float32)
        emb = module.embed(feats).numpy()
        for i in range(min(self.warmup, len(feats))):
            module.embed(feats[i : i + 1])
            retrieval.search(index, emb[i], self.k)
        self._sync(module)
        t0 = time.perf_counter()
        for i in range(len(feats)):
            e = module.embed(feats[i : i + 1]).numpy()
            retrieval.search(index, e, self.k)
        self._sync(module)
        t_head = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(feats)):
            retrieval.search(index, emb[i], self.k)
        t_search = time.perf_counter() - t0
        self.results = {"head_search_queries_per_second": len(feats) / t_head,
                        "search_queries_per_second": len(feats) / t_search}
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"throughput/{k}": v for k, v in self.results.items()})
