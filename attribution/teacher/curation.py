"""Two-stage curation, stage 1: each training query's K nearest training items (faiss).

The stage-1 feature spaces here need no pretrained network: ``pixels`` (the model-space sample),
``text`` (mean-pooled prompt/caption token states) or ``pixels+text`` (both, each L2-normalized).
"""

from __future__ import annotations

import numpy as np
import torch

SPACES = ("pixels", "text", "pixels+text")


def _l2n(x: torch.Tensor) -> np.ndarray:
    x = x.float().flatten(1)
    return torch.nn.functional.normalize(x, dim=1).numpy().astype(np.float32)


def stage1_features(space: str, z: torch.Tensor, cond: torch.Tensor) -> np.ndarray:
    """float32 (B, D) features of model-space samples z (B, C, h, w) and token states (B, L, D)."""
    if space not in SPACES:
        raise ValueError(f"unknown stage-1 feature space {space!r}; choose from {SPACES}")
    parts = []
    if "pixels" in space:
        parts.append(_l2n(z))
    if "text" in space:
        parts.append(_l2n(cond.float().mean(1)))
    return np.concatenate(parts, 1)


def nearest_items(item_feats: np.ndarray, query_feats: np.ndarray, k: int) -> np.ndarray:
    """int64 (Q, k) indices of the k items with the largest inner product, best first."""
    import faiss

    if k > item_feats.shape[0]:
        raise ValueError(f"K={k} candidates requested from only {item_feats.shape[0]} items")
    index = faiss.IndexFlatIP(item_feats.shape[1])
    index.add(np.ascontiguousarray(item_feats))
    _, ids = index.search(np.ascontiguousarray(query_feats), k)
    return ids.astype(np.int64)
