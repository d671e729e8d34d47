"""Known-answer check of a teacher on the toy world's planted rare concepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attribution.metrics import (
    chance_reciprocal_rank,
    recall_at_k,
    reciprocal_rank,
    standard_error,
)


def planted_known_answers(item_attributes: list[dict], query_attributes: list[dict],
                          rank: np.ndarray, planted: list[dict], k: int = 10) -> dict:
    """Per planted concept: recall@k and MRR of the planted items over the queries that prompt
    the concept, with what a random ranking would give.

    Args:
        rank: int (Q, N) training ids, most influential first (test queries: the whole set).
    """
    n_items = rank.shape[1]
    sources = known_sources(item_attributes, query_attributes, planted)
    out = {}
    for concept in planted:
        name = f"{concept['attribute']}={concept['value']}"
        qids = [q for q, s in enumerate(sources) if name in s]
        positives = sources[qids[0]][name] if qids else set()
        if not positives:
            continue
        recalls = [recall_at_k(rank[q], positives, k) for q in qids]
        rrs = [reciprocal_rank(rank[q], positives) for q in qids]
        out[name] = {
            "queries": len(qids), "planted_items": len(positives),
            f"recall@{k}": float(np.mean(recalls)),
            f"recall@{k}_stderr": standard_error(recalls),  # over the concept's queries
            f"chance_recall@{k}": min(k, n_items) / n_items,
            "mrr": float(np.mean(rrs)),
            "chance_mrr": chance_reciprocal_rank(n_items, len(positives)),
        }
    return out


def planted_mask(query_attributes: list[dict], planted: list[dict]) -> np.ndarray:
    """bool (Q,): which queries prompt one of the ``planted`` concepts (their top-k is a known
    answer); the others are *ordinary*."""
    return np.array([any(a.get(p["attribute"]) == p["value"] for p in planted)
                     for a in query_attributes], dtype=bool)


def known_sources(item_attributes: list[dict], query_attributes: list[dict],
                  planted: list[dict]) -> list[dict[str, set[int]]]:
    """Per query, ``{"<attr>=<value>": training ids}`` of every planted concept it prompts —
    the only items that show that concept, so its known answers; empty for an ordinary query."""
    items = {f"{p['attribute']}={p['value']}": (p["attribute"], p["value"], {
        i for i, a in enumerate(item_attributes) if a.get(p["attribute"]) == p["value"]})
        for p in planted}
    return [{name: ids for name, (a, v, ids) in items.items() if attrs.get(a) == v}
            for attrs in query_attributes]


def format_known_answers(known: dict) -> str:
    lines = [f"{'concept':<16}{'queries':>8}{'recall@10':>11}{'chance':>9}{'MRR':>8}{'chance':>9}"]
    for name, r in known.items():
        lines.append(f"{name:<16}{r['queries']:>8}{r['recall@10']:>11.3f}"
                     f"{r['chance_recall@10']:>9.4f}{r['mrr']:>8.3f}{r['chance_mrr']:>9.4f}")
    return "\n".join(lines)


def teacher_storage_bytes(world_dir: Path, generator_dir: Path, fisher_dir: Path) -> int:
    """What the teacher keeps to answer a query: generator weights, Fisher, training data."""
    files = [f for d in (Path(generator_dir) / "unet", Path(fisher_dir))
             for f in d.rglob("*.safetensors")]
    world = Path(world_dir)
    data = sum(f.stat().st_size for f in world.rglob("*.np[yz]")) or sum(
        f.stat().st_size for f in world.rglob("*.png"))
    return sum(f.stat().st_size for f in files) + data
