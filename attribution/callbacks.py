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
from attribution.metrics import average_precisions, mean_average_precision, standard_error


def rank_all(query_emb: torch.Tensor, item_emb: torch.Tensor) -> np.ndarray:
    """Full rankings int (Q, N) by inner product, best first (ties broken by id)."""
    scores = (query_emb @ item_emb.T).numpy()
    return np.argsort(-scores, axis=1, kind="stable")


def ap_at_k(rankings: np.ndarray, teacher_rank: np.ndarray, k: int) -> np.ndarray:
    """Each query's AP@k, float (Q,): positives = the teacher's full-set top-k of the query."""
    return average_precisions(list(rankings), [set(r[:k].tolist()) for r in teacher_rank])


def map_at_ks(rankings: np.ndarray, teacher_rank: np.ndarray, ks: list[int]) -> dict[str, float]:
    """mAP@k: positives = the teacher's full-set top-k of each query; the whole set is ranked."""
    out = {}
    for k in ks:
        aps = ap_at_k(rankings, teacher_rank, k)
        out[f"mAP@{k}"], out[f"mAP@{k}_stderr"] = float(aps.mean()), standard_error(aps)
    return out


def map_by_type(rank: np.ndarray, teacher_rank: np.ndarray, ks: list[int],
                types: dict[str, np.ndarray]) -> dict[str, float]:
    """``{"<type>.mAP@k": ..., "<type>.mAP@k_stderr": ...}`` over each type's queries (boolean
    masks over the rows; an empty type is left out)."""
    out = {}
    for name, mask in types.items():
        if mask.any():
            out.update({f"{name}.{k}": v
                        for k, v in map_at_ks(rank[mask], teacher_rank[mask], ks).items()})
    return out


def feature_baseline(item_feats, query_feats, teacher_rank, ks) -> dict[str, float]:
    """mAP of the untuned features: cosine similarity in the raw feature space."""
    qi = F.normalize(torch.as_tensor(np.asarray(query_feats), dtype=torch.float32), dim=-1)
    ii = F.normalize(torch.as_tensor(np.asarray(item_feats), dtype=torch.float32), dim=-1)
    return map_at_ks(rank_all(qi, ii), teacher_rank, ks)


def kset_map(query_emb: torch.Tensor, item_emb: torch.Tensor, ksets: np.ndarray,
             k: int) -> tuple[float, float]:
    """mAP@k of held-out TRAINING queries, within their K-sets (what released data offers).

    Args:
        query_emb: float (V, D) embedded validation queries.
        item_emb: float (N, D) embedded items (only the K-set rows are read).
        ksets: int (V, K) each query's stage-1 candidates in the teacher's order, best first.
        k: positives = the teacher's top-k of the K-set; the K candidates are ranked by
            ``query_emb @ item_emb`` (ties by position in the K-set).

    Returns:
        (mAP, its standard error over queries).
    """
    return _pool_map(query_emb, item_emb, np.asarray(ksets), ksets, k)


def fullset_kset_map(query_emb: torch.Tensor, item_emb: torch.Tensor, ksets: np.ndarray,
                     k: int) -> tuple[float, float]:
    """mAP@k of held-out TRAINING queries with the WHOLE training set ranked: positives are the
    teacher's top-k of each query's K-set (all the released data says), ranked among all N items
    by ``query_emb @ item_emb`` (ties by id).  Unlike :func:`kset_map` it also charges a head for
    lifting items from outside the K-set above the positives, as the full-set test metric does;
    it assumes stage 1 kept the teacher's top-k (the toy run measures that: curation recall).

    Args:
        query_emb: float (V, D); item_emb: float (N, D) every item embedded;
        ksets: int (V, K) item ids in the teacher's order, best first.
    """
    return mean_average_precision(list(rank_all(query_emb.detach(), item_emb.detach())),
                                  [set(r[:k].tolist()) for r in ksets])


def outside_samples(ksets: np.ndarray, n_items: int, r: int, seed: int) -> np.ndarray:
    """int (V, R') ids drawn uniformly without replacement from outside each query's K-set,
    R' = min(r, N − K): the known negatives of :func:`sampled_kset_map`.  A function of
    (``seed``, the K-sets) only."""
    ksets = np.asarray(ksets)
    n_out = min(int(r), n_items - ksets.shape[1])
    if n_out < 1:
        return np.zeros((len(ksets), 0), dtype=np.int64)
    rng = np.random.default_rng([int(seed), 83])
    out = np.empty((len(ksets), n_out), dtype=np.int64)
    for v, row in enumerate(ksets):
        pool = np.setdiff1d(np.arange(n_items), row, assume_unique=False)
        out[v] = rng.choice(pool, size=n_out, replace=False)
    return out


def sampled_kset_map(query_emb: torch.Tensor, item_emb: torch.Tensor, ksets: np.ndarray,
                     outside: np.ndarray, k: int) -> tuple[float, float]:
    """mAP@k of held-out TRAINING queries over their K-set plus a uniform sample of items from
    outside it (the ``sampled`` validation scope).

    The positives are the teacher's top-k of each K-set.  Every other item ranked has a label
    the data supports: a K-set item below the teacher's top k is a known negative, and so is a
    random item from outside the K-set (stage 1 left it out; under a curation recall near 1 it
    is not among the teacher's top k, and a random draw is no more likely to be one for being
    near the query in any feature space).  Ranking every item instead (``full``) also counts
    as negatives the items just outside the K-set — exactly those a head that departs from the
    stage-1 features lifts, and the ones stage 1 missed — so it favours the stage-1 features;
    ranking the K-set alone (``kset``) cannot see a head that lifts far items above the
    positives.  docs/pipeline.md, "Validation".

    Args:
        query_emb: float (V, D) embedded validation queries.
        item_emb: float (N, D) every item embedded (only the rows named are read).
        ksets: int (V, K) each query's stage-1 candidates in the teacher's order, best first.
        outside: int (V, R) items from outside each K-set (:func:`outside_samples`).
        k: positives per query.

    Returns:
        (mAP, its standard error over queries); ties are broken by position in
        [K-set, outside sample], i.e. in the positives' favour.
    """
    return _pool_map(query_emb, item_emb, np.concatenate([np.asarray(ksets),
                                                          np.asarray(outside)], 1), ksets, k)


def _pool_map(query_emb: torch.Tensor, item_emb: torch.Tensor, pool: np.ndarray,
              ksets: np.ndarray, k: int) -> tuple[float, float]:
    """mAP of each query's teacher top-k of its K-set, ranked among ``pool`` (V, P) item ids
    by inner product (ties by position in the pool).  Scores come from one (V, N) product,
    so memory is O(V·N), never O(V·P·D)."""
    with torch.no_grad():
        scores = (query_emb @ item_emb.T).detach().numpy()
    pooled = np.take_along_axis(scores, pool, 1)
    order = np.argsort(-pooled, axis=1, kind="stable")
    ranked = np.take_along_axis(pool, order, 1)
    return mean_average_precision(list(ranked), [set(r[:k].tolist()) for r in ksets])


VAL_SCOPES = ("kset", "sampled", "full")


class ValidationCallback(L.Callback):
    """Validation on held-out training queries: logs ``val/mAP@k`` (+ ``_stderr``) after every
    epoch, keeps the best head's weights (the untrained head, "epoch 0", competes too) and stops
    after ``patience`` epochs without a better figure.  The test queries are never read here.

    Args:
        item_feats: float (N, D) item features; query_feats: float (V, D) validation queries;
        ksets: int (V, K) their teacher-ordered K-sets; k: positives per query.
        scope: ``kset`` ranks the positives among the K-set (:func:`kset_map`, the default),
            ``sampled`` among the K-set and ``outside`` random items from outside it
            (:func:`sampled_kset_map`), ``full`` among every item (:func:`fullset_kset_map`).
        outside: R for ``sampled`` (default: K, as many outside items as candidates).
        seed: what the outside sample is drawn with.
    """

    def __init__(self, item_feats, query_feats, ksets: np.ndarray, k: int,
                 patience: int | None = None, scope: str = "kset",
                 outside: int | None = None, seed: int = 0):
        if scope not in VAL_SCOPES:
            raise ValueError(f"validation scope must be one of {VAL_SCOPES}, got {scope!r}")
        self.items = torch.as_tensor(np.asarray(item_feats), dtype=torch.float32)
        self.queries = torch.as_tensor(np.asarray(query_feats), dtype=torch.float32)
        self.ksets, self.k, self.patience = np.asarray(ksets), k, patience
        self.scope = scope
        pool = self.ksets
        if scope == "sampled":
            r = self.ksets.shape[1] if outside is None else outside
            self.outside = outside_samples(self.ksets, len(self.items), r, seed)
            pool = np.concatenate([self.ksets, self.outside], 1)
        # sampled / kset: only the items named are embedded at each evaluation; full: every item
        self.ids, inverse = np.unique(pool, return_inverse=True)
        self.local = inverse.reshape(pool.shape)
        self.best, self.best_se, self.best_epoch, self.best_state = -1.0, 0.0, None, None
        self.history: list[float] = []
        self.wait = 0
        self.baseline: tuple[float, float] = (float("nan"), float("nan"))
        self.last: tuple[float, float] = (float("nan"), float("nan"))

    def evaluate(self, embed, rows: np.ndarray | None = None) -> tuple[float, float]:
        """(mAP@k, s.e.) with ``embed``: float (B, D) features -> (B, D') unit embeddings;
        ``rows``: only these validation queries (a boolean mask or indices; e.g. those on the
        validation concepts), default all."""
        sel = np.arange(len(self.ksets)) if rows is None else np.arange(len(self.ksets))[rows]
        if self.scope == "full":
            return fullset_kset_map(embed(self.queries[sel]), embed(self.items),
                                    self.ksets[sel], self.k)
        local = self.local[sel]
        emb_q, emb_i = embed(self.queries[sel]), embed(self.items[self.ids])
        if self.scope == "kset":
            return kset_map(emb_q, emb_i, local, self.k)
        kk = self.ksets.shape[1]
        return sampled_kset_map(emb_q, emb_i, local[:, :kk], local[:, kk:], self.k)

    def consider(self, module, epoch: int) -> None:
        """Evaluate ``module`` as the head after ``epoch`` epochs; keep it if it is the best."""
        self.last = self.evaluate(module.embed)
        self.history.append(self.last[0])
        if self.last[0] > self.best:
            self.best, self.best_epoch, self.wait = self.last[0], epoch, 0
            self.best_se = self.last[1]
            self.best_state = {k: v.detach().cpu().clone()
                               for k, v in module.head.state_dict().items()}
        else:
            self.wait += 1

    def on_fit_start(self, trainer, module) -> None:
        self.baseline = self.evaluate(lambda x: F.normalize(x, dim=-1))
        self.consider(module, 0)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.consider(module, trainer.current_epoch + 1)
        module.log(f"val/mAP@{self.k}", self.last[0], prog_bar=True)
        module.log(f"val/mAP@{self.k}_stderr", self.last[1])
        module.log(f"val/baseline_mAP@{self.k}", self.baseline[0])
        if self.patience is not None and self.wait >= self.patience:
            trainer.should_stop = True


class ThroughputCallback(L.Callback):
    """After training: queries/s for head + search (per single query, after warm-up) and for
    the search alone, over an exact index of every embedded training item."""

    def __init__(self, item_feats, query_feats, k: int = 10, n_queries: int = 50,
                 warmup: int = 5, gpu: bool = False):
        self.item_feats, self.query_feats = item_feats, query_feats
        self.k, self.n, self.warmup, self.gpu = k, n_queries, warmup, gpu
        self.results: dict[str, float] = {}

    def results_as(self, prefix: str) -> dict[str, float]:
        """The measured rates under ``prefix`` (``student.head_search_queries_per_second``)."""
        return {f"{prefix}{k}": v for k, v in self.results.items()}

    @staticmethod
    def _sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_fit_end(self, trainer, module) -> None:
        index = retrieval.build_index(module.embed(self.item_feats).numpy(), gpu=self.gpu)
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
