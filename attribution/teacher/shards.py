"""Per-query result shards (written atomically, never overwritten) and the merged outputs.

Shard: ``shards/<split>/<query_id:06d>.npz`` with ``candidates`` int64 (K,), ``influence``
float32 (K,) and ``info`` (JSON: losses before/after, seconds).

Merged, released layout (docs/method.md §6):
- ``influence_train.pkl``: {'random': {'rank': (Q, K) training ids, most influential first;
  'influence_subset': (Q, K) scores aligned with the stage-1 candidate order;
  'rank_influence_subset': (Q, K) positions into that candidate list, most influential first}}
- ``influence_test.pkl``: {'random': {'influence': (Q, N), 'rank': (Q, N)}}
Our own: ``teacher_<split>.npz`` with query_ids, candidates, influence, rank.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from attribution.common.files import DataFileError, atomic_save_npz, atomic_write_bytes, load_npz


class ShardStore:
    def __init__(self, root: str | Path):
        self.root = Path(root) / "shards"

    def path(self, split: str, query_id: int) -> Path:
        return self.root / split / f"{query_id:06d}.npz"

    def done(self, split: str) -> set[int]:
        d = self.root / split
        if not d.is_dir():
            return set()
        return {int(p.stem) for p in d.glob("*.npz")}

    def write(self, split: str, query_id: int, candidates: np.ndarray, influence: np.ndarray,
              info: dict) -> bool:
        """Write a shard atomically; an existing shard is kept (returns False), never replaced."""
        path = self.path(split, query_id)
        if path.exists():
            return False
        if candidates.shape != influence.shape:
            raise ValueError("candidates and influence differ in shape")
        if not np.isfinite(influence).all():
            raise FloatingPointError(f"refusing to write non-finite influence for {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npz(path, candidates=candidates.astype(np.int64),
                        influence=influence.astype(np.float32), info=np.array(json.dumps(info)))
        return True

    def read(self, split: str, query_id: int) -> tuple[np.ndarray, np.ndarray, dict]:
        path = self.path(split, query_id)
        hint = ("delete it; rerunning the teacher (`attribution teacher score CONFIG`) scores "
                "only the queries without a shard")
        f = load_npz(path, "Teacher shard", rebuild=hint)
        try:
            cands, infl, info = f["candidates"], f["influence"], json.loads(str(f["info"]))
        except (KeyError, ValueError) as err:
            raise DataFileError(f"Teacher shard {path} lacks {err}. To rebuild it, {hint}.") \
                from err
        if cands.shape != infl.shape or cands.ndim != 1 or not np.isfinite(infl).all():
            raise DataFileError(f"Teacher shard {path} holds {cands.shape} candidates and "
                                f"{infl.shape} influences (or non-finite ones). To rebuild it, "
                                f"{hint}.")
        return cands, infl, info

    def merge(self, split: str, n_queries: int) -> dict[str, np.ndarray | list]:
        """Stack every shard of a split; fails listing the missing query ids."""
        missing = sorted(set(range(n_queries)) - self.done(split))
        if missing:
            raise DataFileError(f"{len(missing)} {split} queries have no shard yet "
                                f"(first: {missing[:10]}); run the teacher again to finish them")
        cands, infl, infos = zip(*(self.read(split, q) for q in range(n_queries)))
        if len({len(c) for c in cands}) != 1:
            raise DataFileError(f"{split} shards have different candidate counts")
        candidates, influence = np.stack(cands), np.stack(infl)
        order = np.argsort(-influence, axis=1, kind="stable")
        return {"query_ids": np.arange(n_queries), "candidates": candidates,
                "influence": influence, "order": order,
                "rank": np.take_along_axis(candidates, order, 1), "info": list(infos)}


def write_merged(out: Path, split: str, merged: dict, n_items: int) -> None:
    """Write the released-layout pickle and our npz for one split."""
    if split == "train":
        payload = {"random": {"rank": merged["rank"],
                              "influence_subset": merged["influence"],
                              "rank_influence_subset": merged["order"]}}
    else:
        full = np.full((len(merged["query_ids"]), n_items), np.nan, np.float32)
        np.put_along_axis(full, merged["candidates"], merged["influence"], 1)
        if np.isnan(full).any():
            raise ValueError("test queries must be scored against the whole training set")
        payload = {"random": {"influence": full, "rank": merged["rank"]}}
    atomic_write_bytes(out / f"influence_{split}.pkl", pickle.dumps(payload, protocol=4))
    atomic_save_npz(out / f"teacher_{split}.npz", query_ids=merged["query_ids"],
                    candidates=merged["candidates"], influence=merged["influence"],
                    rank=merged["rank"])
