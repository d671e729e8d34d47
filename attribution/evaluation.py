"""The run's headline figures (``runs/<name>/metrics.json``), computed from finished artifacts.

Every method is measured on the same test queries against the teacher's full-set ranking:
mAP@k overall and on ordinary / planted-concept queries apart, known-answer recall, the teacher's
ceiling (its agreement with itself under fresh noise), throughput and storage.  Inputs are stage
folders (``dirs``: stage name -> folder) and the summaries of the stages that finished
(``finished``: stage name -> its ``stage.json`` summary); nothing here runs a stage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from attribution.callbacks import ap_at_k, map_at_ks, map_by_type
from attribution.common.files import (
    DataFileError,
    Dirs,
    atomic_write_bytes,
    load_npy,
    load_npz,
)
from attribution.config import planted_for, to_dict
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.student.deploy import student_test_ranks
from attribution.teacher.ceiling import self_agreement
from attribution.teacher.evaluate import planted_known_answers, teacher_storage_bytes
from attribution.teacher.stages import test_query_types


def known_answer_recall(cfg, world_dir: Path, queries_dir: Path, rank: np.ndarray) -> dict:
    """{'<attr>=<value> recall@10': ...} of the planted concepts' test queries for a ranking."""
    world = CaptionedImageSet(world_dir, verify=False)
    test = QuerySet(Path(queries_dir) / "query_test")
    known = planted_known_answers(world.attributes, test.attributes, rank,
                                  [to_dict(p) for p in planted_for(cfg.world, "test")])
    out = {}
    for name, r in known.items():
        out[f"{name} recall@10"] = r["recall@10"]
        out[f"{name} recall@10_stderr"] = r["recall@10_stderr"]  # over the concept's queries
    return out


def query_types(cfg, queries_dir: Path) -> dict[str, np.ndarray]:
    """Boolean masks over the test queries: ``planted`` and ``ordinary`` (the ceiling stage's
    strata: :func:`attribution.teacher.stages.test_query_types`)."""
    return test_query_types(cfg, queries_dir)


def released_metrics(student: dict) -> dict:
    """Released-data mode: no generator, teacher or extractor here, the student's own figures;
    features come precomputed, so a query's cost is the head + the search."""
    out = {k: v for k, v in student.items() if k.startswith(("student.", "baseline."))}
    out["student.queries_per_second"] = student.get(
        "student.head_search_queries_per_second", float("nan"))
    return out


def run_metrics(cfg, dirs: Dirs, finished: Mapping[str, dict]) -> dict:
    """The flat headline figures of a run whose student (and teacher) finished."""
    student = json.loads((dirs["student"] / "metrics.json").read_text())
    if cfg.data.source == "released":
        return released_metrics(student)
    teacher = finished["teacher"]
    out = {k: v for k, v in student.items()
           if k.startswith(("student.mAP", "student.val_", "baseline."))}
    # Test queries are scored against the whole training set: that is a query's real cost.
    out["teacher.seconds_per_query"] = teacher["seconds_per_test_query"]
    out["teacher.seconds_per_train_query"] = teacher["seconds_per_train_query"]
    for name, r in teacher.get("known_answers", {}).items():
        out[f"teacher.{name}_recall@10"] = r["recall@10"]
        if "recall@10_stderr" in r:  # teacher folders finished before it was recorded lack it
            out[f"teacher.{name}_recall@10_stderr"] = r["recall@10_stderr"]
    student_rank = student_test_ranks(cfg, dirs["features"], dirs["student"])
    for name, v in known_answer_recall(cfg, dirs["world"], dirs["queries"],
                                       student_rank).items():
        out[f"student.{name.replace(' ', '_')}"] = v
    # every method's mAP on ordinary and on planted-concept test queries apart
    types = query_types(cfg, dirs["queries"])
    with np.load(dirs["teacher"] / "teacher_test.npz") as merged:
        teacher_rank = merged["rank"]
    ks = [k for k in cfg.student.k_eval if k <= teacher_rank.shape[1]]
    ceiling = finished.get("ceiling")
    if ceiling is not None:  # the teacher against itself: every method's ceiling
        out.update({f"teacher.{k}": v for k, v in ceiling.items()})
        # overall and per query type, beside each method's figure of that type
        out.update({f"teacher.{k}": v for k, v in self_agreement(
            dirs["ceiling"], teacher_rank, ks,
            ceiling.get("self_rows", ceiling.get("self_queries", 0)), types).items()})
    ranked = {"student": student_rank}
    if (dirs["student"] / "rank_whitened.npy").is_file():  # the whitened head's start
        ranked["baseline.whitened"] = np.load(dirs["student"] / "rank_whitened.npy")
    baselines = finished.get("baselines") is not None
    if baselines:
        ranked.update({f"baseline.{p.stem[5:]}": np.load(p)
                       for p in sorted(dirs["baselines"].glob("rank_*.npy"))})
    for method, rank in ranked.items():
        out.update({f"{method}.{k}": v
                    for k, v in map_by_type(rank, teacher_rank, ks, types).items()})
    if finished.get("second_teacher") is not None:
        out.update(second_teacher_metrics(dirs["second_teacher"], teacher_rank, ranked, ks,
                                          types, finished["second_teacher"]))
    out.update(cost_metrics(cfg, dirs, student.get("end_to_end", {}),
                            out["teacher.seconds_per_query"]))
    if baselines:
        base = json.loads((dirs["baselines"] / "baselines.json").read_text())
        for method, r in base.items():
            for k, v in r.items():
                out.setdefault(f"baseline.{method}.{k.replace(' ', '_')}", v)
    return out


def cost_metrics(cfg, dirs: Dirs, e2e: dict, teacher_seconds: float) -> dict:
    """Queries/s end to end and storage of the student, its untuned features and the teacher
    (``e2e``: the student stage's end-to-end measurement)."""
    feature = cfg.student.feature
    qps = e2e.get("queries_per_second", float("nan"))
    return {"student.queries_per_second": qps,
            "search.queries_per_second": e2e.get("search_queries_per_second", float("nan")),
            "speedup_vs_teacher": teacher_seconds * qps,
            f"baseline.{feature}.queries_per_second": e2e.get("baseline_queries_per_second",
                                                              float("nan")),
            "student.storage_bytes": e2e.get("storage_bytes", 0),
            f"baseline.{feature}.storage_bytes": e2e.get("baseline_storage_bytes", 0),
            "teacher.storage_bytes": teacher_storage_bytes(dirs["world"], dirs["generator"],
                                                           dirs["fisher"]),
            "n_items": e2e.get("n_items", 0)}


def second_teacher_metrics(folder: Path, teacher_rank: np.ndarray,
                           ranked: dict[str, np.ndarray], ks: list[int],
                           types: dict[str, np.ndarray], summary: dict) -> dict:
    """Every method against the second teacher (``second.<method>.mAP@k``, per query type
    too), and the two teachers against each other: ``second.teacher.mAP@k`` is the run's
    teacher ranked against the second's top k, ``teacher.second.mAP@k`` the second's ranking
    against the run's teacher's top k (mAP is not symmetric)."""
    second = load_npz(Path(folder) / "teacher_test.npz", "the second teacher's rankings")["rank"]
    if second.shape != teacher_rank.shape:
        raise DataFileError(f"the second teacher ranked {second.shape} (queries, items), the "
                            f"run's teacher {teacher_rank.shape}: delete {folder} and rerun")
    out = {"second.name": summary.get("name", "second teacher"),
           "second.seconds_per_query": summary.get("seconds_per_query", float("nan"))}
    def scored(rank, against):
        return {**map_at_ks(rank, against, ks), **map_by_type(rank, against, ks, types)}

    for method, rank in {**ranked, "teacher": teacher_rank}.items():
        out.update({f"second.{method}.{k}": v for k, v in scored(rank, second).items()})
    out.update({f"teacher.second.{k}": v for k, v in scored(second, teacher_rank).items()})
    return out


def per_query_ap(cfg, dirs: Dirs) -> dict[str, np.ndarray]:
    """Each test query's AP@k against the teacher, for every ``student.k_eval`` k: the student
    (``student@k``) and, when the baselines finished, its untuned input features
    (``baseline@k``); with a finished second teacher the same against it (``second:...``).
    Two runs scored on the same test queries are compared pairwise with these (a paired
    standard error: docs/pipeline.md, sweeps)."""
    teacher_rank = load_npz(Path(dirs["teacher"]) / "teacher_test.npz",
                            "teacher test rankings")["rank"]
    ranked = {"student": student_test_ranks(cfg, dirs["features"], dirs["student"])}
    base = Path(dirs["baselines"]) / f"rank_{cfg.student.feature}.npy"
    if base.is_file():
        ranked["baseline"] = load_npy(base, "baseline test rankings")
    refs = {"": teacher_rank}
    second = Path(dirs.get("second_teacher", "")) / "teacher_test.npz"
    if cfg.second_teacher.enabled and second.is_file():  # "second:student@k", ...
        refs["second:"] = load_npz(second, "the second teacher's rankings")["rank"]
    return {f"{prefix}{name}@{k}": ap_at_k(rank, ref, k)
            for prefix, ref in refs.items()
            for k in cfg.student.k_eval if k <= teacher_rank.shape[1]
            for name, rank in ranked.items()}


def write_metrics(cfg, dirs: Dirs, finished: Mapping[str, dict], path: Path) -> dict:
    """:func:`run_metrics`, written atomically to ``path``."""
    out = run_metrics(cfg, dirs, finished)
    atomic_write_bytes(Path(path), json.dumps(out, indent=2).encode())
    return out
