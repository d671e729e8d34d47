"""Ranking metrics: pure functions of rankings and positive sets (no Lightning, no torch).

Conventions: ``ranked_ids`` is a 1-D sequence of item ids, best first (a full or truncated
ranking); ``positive_ids`` the set of relevant ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def _positions(ranked_ids: Sequence[int], positive_ids: Iterable[int]) -> np.ndarray:
    """0-based positions of the positives in the ranking (positives not ranked are left out)."""
    pos = set(int(p) for p in positive_ids)
    ranked = np.asarray(ranked_ids)
    return np.flatnonzero(np.isin(ranked, list(pos)))


def average_precision(ranked_ids: Sequence[int], positive_ids: Iterable[int]) -> float:
    """AP = mean over positives of precision at each positive's position.

    A positive missing from ``ranked_ids`` contributes precision 0. Equals sklearn's
    ``average_precision_score(y_true=membership, y_score=-rank)`` on a full ranking.
    """
    positives = set(int(p) for p in positive_ids)
    if not positives:
        raise ValueError("average_precision needs at least one positive")
    where = _positions(ranked_ids, positives)
    hits = np.arange(1, len(where) + 1)
    return float(np.sum(hits / (where + 1)) / len(positives))


def standard_error(values) -> float:
    """Standard error of the mean (sample std / √n); 0 for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def average_precisions(rankings: Sequence[Sequence[int]],
                       positives: Sequence[Iterable[int]]) -> np.ndarray:
    """Each query's AP: float (Q,)."""
    if len(rankings) != len(positives) or not len(rankings):
        raise ValueError("need one positive set per ranking, and at least one query")
    return np.array([average_precision(r, p) for r, p in zip(rankings, positives)])


def mean_average_precision(rankings: Sequence[Sequence[int]],
                           positives: Sequence[Iterable[int]]) -> tuple[float, float]:
    """(mean AP over queries, standard error of that mean)."""
    aps = average_precisions(rankings, positives)
    return float(aps.mean()), standard_error(aps)


def recall_at_k(ranked_ids: Sequence[int], positive_ids: Iterable[int], k: int) -> float:
    """|top-k ∩ positives| / |positives|."""
    positives = set(int(p) for p in positive_ids)
    if not positives:
        raise ValueError("recall_at_k needs at least one positive")
    top = set(int(i) for i in np.asarray(ranked_ids)[:k])
    return len(top & positives) / len(positives)


def reciprocal_rank(ranked_ids: Sequence[int], positive_ids: Iterable[int]) -> float:
    """1 / (1-based position of the first positive); 0 if none is ranked."""
    where = _positions(ranked_ids, positive_ids)
    return float(1.0 / (where[0] + 1)) if len(where) else 0.0


def chance_reciprocal_rank(n_items: int, n_positives: int) -> float:
    """E[1 / position of the first positive] under a uniformly random ranking."""
    expected, p_none_yet = 0.0, 1.0
    for r in range(1, n_items - n_positives + 2):
        p_first_here = p_none_yet * n_positives / (n_items - r + 1)
        expected += p_first_here / r
        p_none_yet *= (n_items - r + 1 - n_positives) / (n_items - r + 1)
    return expected
