"""Stage ``student``: train the head on the teacher's rankings, evaluate it once on the test
queries, build the index, and time the deployed student end to end."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from attribution.common.files import Dirs, atomic_write_bytes
from attribution.data.released import check_released
from attribution.student.deploy import end_to_end_throughput
from attribution.student.train import train_student


def run_student(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """``inputs``: the features and teacher folders (and world, toyclip, queries for the
    throughput); with ``data.source=released``, only ``released``: the released data root."""
    if cfg.data.source == "released":
        root = inputs["released"]
        check_released(root, [cfg.student.feature])
        metrics = train_student(cfg, root / "feats", root, out, progress, released=True)
    else:
        metrics = train_student(cfg, inputs["features"], inputs["teacher"], out, progress,
                                gallery=functools.partial(log_gallery, cfg, inputs))
        metrics["end_to_end"] = end_to_end_throughput(cfg, {**inputs, "student": out})
        if "baseline.whitened.mAP@" + str(cfg.student.k_eval[0]) in metrics:
            metrics.update(whitened_cost(cfg, inputs, out))
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics


GALLERY_QUERIES = 8  # the test queries a W&B run shows (the same ones in every run)


def log_gallery(cfg, inputs: Dirs, logger, embed, feats: dict, test_rank: np.ndarray) -> None:
    """A W&B table of the first test queries with the chosen head: the query image and prompt,
    the student's AP@k against the teacher, and the top k of the student and of the teacher as
    image strips, so a sweep's runs can be compared side by side in W&B's table view.  Other
    loggers (csv, none) get nothing."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import wandb

    from attribution.callbacks import ap_at_k, rank_all
    from attribution.data.dataset import CaptionedImageSet
    from attribution.data.queries import QuerySet

    world = CaptionedImageSet(inputs["world"], verify=False)
    qs = QuerySet(inputs["queries"] / "query_test")
    k = cfg.student.k_eval[0]
    n = min(GALLERY_QUERIES, len(qs))
    rank = rank_all(embed(feats["query_test"][:n]), embed(feats["items"]))
    aps = ap_at_k(rank, test_rank[:n], k)

    def strip(ids) -> wandb.Image:
        return wandb.Image(np.concatenate([np.asarray(world.images[int(i)]) for i in ids], 1))

    rows = [[i, wandb.Image(qs.image(i)), qs.captions[i], float(aps[i]), strip(rank[i, :k]),
             strip(test_rank[i, :k])] for i in range(n)]
    logger.log_table("test_gallery", columns=["query", "image", "prompt", f"student AP@{k}",
                                              f"student top {k}", f"teacher top {k}"], data=rows)


def whitened_cost(cfg, inputs: Dirs, out: Path) -> dict:
    """Queries/s and storage of the whitened features deployed alone (features -> whitening
    -> flat cosine search): the untuned search plus one D x D product a query."""
    from attribution.student.deploy import feature_search_throughput, load_head

    head = load_head(out)
    center, whitener = head.center.numpy(), head.whitener.numpy()
    deployed = feature_search_throughput(cfg, inputs, cfg.student.feature,
                                         transform=lambda x: (np.asarray(x) - center) @ whitener)
    return {"baseline.whitened.queries_per_second": deployed["queries_per_second"],
            "baseline.whitened.storage_bytes": deployed["storage_bytes"]
            + int(whitener.size + center.size) * 4}
