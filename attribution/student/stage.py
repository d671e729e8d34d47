"""Stage ``student``: train the head on the teacher's rankings, evaluate it once on the test
queries, build the index, and time the deployed student end to end."""

from __future__ import annotations

import json
from pathlib import Path

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
        metrics = train_student(cfg, inputs["features"], inputs["teacher"], out, progress)
        metrics["end_to_end"] = end_to_end_throughput(cfg, {**inputs, "student": out})
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics
