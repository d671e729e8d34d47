"""Teacher rankings + cached features -> query/candidate training batches.

A batch holds B queries × P candidates each (pairs grouped by query, so each distinct query and
item is embedded once).  For query q with teacher rank π (0 = most influential) among its kept
M candidates, the target is y = 1 − π/M (higher = more influential).  With probability p a slot
is replaced by a uniformly random item from OUTSIDE q's K-set, with the lowest target 1/M.

Every random choice is a function of (seed, epoch, query, chunk): batches do not depend on the
worker count.  Memory is O(Q·K) (the rank matrix), never a dense Q × N array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from attribution.common.files import DataFileError, safe_pickle_load
from attribution.common.seeds import seeded_generator


@dataclass
class Rankings:
    """Teacher rankings.  train: int (Q_train, K) ids, most influential first (stage-2 K-sets);
    test: int (Q_test, N) full-set ranking (its top-k are the evaluation positives)."""

    train: np.ndarray
    test: np.ndarray


def load_rankings(folder: str | Path, n_items: int) -> Rankings:
    """Read ``influence_train.pkl`` / ``influence_test.pkl`` (released layout, docs/method.md §6)."""
    folder = Path(folder)
    out = {}
    for split in ("train", "test"):
        path = folder / f"influence_{split}.pkl"
        # a pickle from a user's folder may hold code: only arrays and containers are admitted
        data = safe_pickle_load(path, "Teacher rankings")
        try:
            rank = data["random"]["rank"]
        except (KeyError, TypeError, IndexError) as err:
            raise DataFileError(f"Teacher rankings file is not in the released layout "
                                f"({{'random': {{'rank': ...}}}}): {path}: no {err}") from err
        out[split] = as_rank_array(rank, str(path))
        validate_ranks(out[split], n_items, str(path))
        for key in ("influence_subset", "influence"):  # the scores the ranks came from
            scores = data["random"].get(key) if isinstance(data["random"], dict) else None
            if scores is not None:
                arr = np.asarray(scores)
                if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                    bad = np.flatnonzero(~np.isfinite(arr).all(axis=tuple(range(1, arr.ndim))))
                    raise DataFileError(f"{path}: ['random']['{key}'] holds non-finite scores "
                                        f"(query rows {bad[:5].tolist()}): the rankings made "
                                        "from them cannot be trusted")
    if out["test"].shape[1] != n_items:
        raise DataFileError(f"test rankings rank {out['test'].shape[1]} items, but there are "
                            f"{n_items} training items: test queries need full-set rankings")
    return Rankings(out["train"], out["test"])


def as_rank_array(rank, source: str) -> np.ndarray:
    """Item ids as int64; refuses ragged rows, non-numbers and fractional values (a float
    rank in [0, 1) would otherwise be cast to all zeros and train silently)."""
    try:
        arr = np.asarray(rank)
    except ValueError as err:  # ragged nested lists
        raise DataFileError(f"{source}: rankings must be a rectangular array of item ids "
                            f"(rows of equal length): {err}") from err
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and arr.size and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        return arr.astype(np.int64)
    raise DataFileError(f"{source}: rankings must hold whole-number item ids, got "
                        f"{arr.dtype} values" + (f" such as {arr.flat[0]!r}" if arr.size else
                                                 " (empty)"))


def validate_ranks(rank: np.ndarray, n_items: int, source: str, k: int | None = None) -> None:
    if rank.ndim != 2 or 0 in rank.shape:
        raise DataFileError(f"{source}: rankings must be 2-D (queries, candidates) and "
                            f"non-empty, got shape {rank.shape}")
    if rank.size and (rank.min() < 0 or rank.max() >= n_items):
        raise DataFileError(f"{source}: ranking ids must be in [0, {n_items}), found "
                            f"[{rank.min()}, {rank.max()}]")
    if k is not None and rank.shape[1] < k:
        raise DataFileError(f"{source}: queries have {rank.shape[1]} candidates, fewer than K={k}")
    srt = np.sort(rank, axis=1)
    dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(1))
    if len(dup):
        raise DataFileError(f"{source}: query rows {dup[:5].tolist()} repeat a candidate id")


class PairPlan(Dataset):
    """Item (epoch, i) -> one chunk of P candidates of one query, with targets.

    Args:
        ranks: int (Q, K) teacher ranks of the training queries.
        m: keep M of the K candidates per query (a random subset, fixed for the run, order
           kept); None keeps all K.
        pairs_per_query: P, candidates per query in a batch.
    """

    def __init__(self, ranks: np.ndarray, n_items: int, pairs_per_query: int,
                 p_outside: float, m: int | None, seed: int):
        q, k = ranks.shape
        if not 0 <= p_outside < 1:
            raise ValueError("p_outside must be in [0, 1)")
        self.ranks, self.n_items, self.p, self.seed = ranks, n_items, p_outside, seed
        self.m = k if m is None else m
        if not 1 <= self.m <= k:
            raise ValueError(f"keep M={self.m} of K={k} candidates: need 1 <= M <= K")
        if self.m < k:
            keep = np.stack([np.sort(np.asarray(torch.randperm(k, generator=seeded_generator(
                seed, 61, i))[: self.m])) for i in range(q)])
        else:
            keep = np.broadcast_to(np.arange(k), (q, k))
        self.keep = keep  # (Q, M) positions into the K-set, increasing
        self.P = min(pairs_per_query, self.m)
        self.chunks = -(-self.m // self.P)  # ceil
        self.members = [None] * q  # lazily built sets for outside rejection sampling

    def __len__(self) -> int:
        return self.ranks.shape[0] * self.chunks

    def _outside(self, q: int, g: torch.Generator, n: int) -> np.ndarray:
        if self.members[q] is None:
            self.members[q] = set(self.ranks[q].tolist())
        out = []
        while len(out) < n:
            cand = torch.randint(self.n_items, (2 * n + 8,), generator=g).tolist()
            out += [c for c in cand if c not in self.members[q]]
        return np.asarray(out[:n], dtype=np.int64)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        q, chunk = divmod(i, self.chunks)
        g = seeded_generator(self.seed, 67, epoch, q, chunk)
        order = torch.randperm(self.m, generator=seeded_generator(self.seed, 71, epoch, q))
        sel = order[(np.arange(self.P) + chunk * self.P) % self.m].numpy()  # wrap the last chunk
        pos = self.keep[q, sel]
        items = self.ranks[q, pos].copy()
        target = 1.0 - sel / self.m  # rank among the kept M, renormalized
        swap = (torch.rand(self.P, generator=g) < self.p).numpy()
        if swap.any():
            items[swap] = self._outside(q, g, int(swap.sum()))
            target[swap] = 1.0 / self.m
        return {"query": q, "items": torch.from_numpy(items),
                "target": torch.from_numpy(target.astype(np.float32)),
                "outside": torch.from_numpy(swap)}


class EpochKeySampler(Sampler):
    """Yields (epoch, i) keys in an order that is a function of (seed, epoch).

    Data parallel (``world`` > 1): the order is cut into global batches of ``global_batch``
    keys and rank r yields its contiguous share of each, so the ranks' local batches at a step
    together ARE the one-process batch of that step (an incomplete last global batch is
    dropped so every rank has the same number of steps)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 global_batch: int = 1):
        if world > 1 and global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.rank, self.world, self.global_batch = rank, world, global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        order = (torch.randperm(self.n, generator=seeded_generator(self.seed, 73, self.epoch))
                 if self.shuffle else torch.arange(self.n))
        if self.world == 1:
            return order.tolist()
        local = self.global_batch // self.world
        full = self.n // self.global_batch * self.global_batch
        batches = order[:full].view(-1, self.global_batch)
        return batches[:, self.rank * local : (self.rank + 1) * local].flatten().tolist()

    def __iter__(self):
        return iter([(self.epoch, int(i)) for i in self._order()])

    def __len__(self) -> int:
        if self.world == 1:
            return self.n
        return self.n // self.global_batch * (self.global_batch // self.world)


def collate_pairs(batch: list[dict]) -> dict:
    return {"query": torch.tensor([b["query"] for b in batch]),
            "items": torch.stack([b["items"] for b in batch]),
            "target": torch.stack([b["target"] for b in batch]),
            "outside": torch.stack([b["outside"] for b in batch])}


def select_queries(n_available: int, n_queries: int | None, m: int | None,
                   budget: int | None, k: int) -> tuple[int, int | None]:
    """Resolve (Q, M) from data-scaling settings; ``budget`` fixes Q × M."""
    q = n_available if n_queries is None else n_queries
    if q > n_available:
        raise DataFileError(f"student.n_queries={q}: only {n_available} training queries have "
                            "rankings (after the validation queries are held out)")
    if budget is not None:
        if m is not None:
            raise DataFileError("set either student.m or student.budget, not both")
        m = budget // q
        if not 1 <= m <= k:
            raise DataFileError(f"budget {budget} over {q} queries gives M={m}, outside [1, K={k}]")
    return q, m


class PairDataModule(L.LightningDataModule):
    """Training batches of (B queries × P candidates); see the module docstring."""

    def __init__(self, ranks: np.ndarray, n_items: int, queries_per_batch: int = 16,
                 pairs_per_query: int = 128, p_outside: float = 0.1, m: int | None = None,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.plan = PairPlan(ranks, n_items, pairs_per_query, p_outside, m, seed)
        self.bq, self.seed, self.workers = queries_per_batch, seed, num_workers

    def train_dataloader(self) -> DataLoader:
        """``queries_per_batch`` is the GLOBAL batch: under data parallelism each rank loads its
        share (the Trainer must run with ``use_distributed_sampler=False``)."""
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = EpochKeySampler(len(self.plan), self.seed, rank=rank, world=world,
                                  global_batch=self.bq)
        return DataLoader(self.plan, batch_size=self.bq // world, sampler=sampler,
                          collate_fn=collate_pairs, num_workers=self.workers,
                          persistent_workers=False)
