"""The layout of a teacher study's folder, which the counterfactual reads as extra methods.

The studies (``attribution/studies/``: ``attribution study teacher-steps|teacher-curvature``)
write one float32 row of influences over every training item per (step factor, query), and the
counterfactual ranks ``teacher@<factor>``, ``teacher-even@<factor>`` and ``teacher-gn`` from those
rows.  The file layout is the contract between them, so it lives here, below both: the core
reads the files, it never imports the studies.

    <study>/f<factor>[-d<damping>]/<split>_<query>.npy (+ .json: its loss record)
    <study>/gn/<split>_<query>.npy                  (+ .json)
    <study>/path<M>/...                             the same, for an unlearning path
    <study>/steps[_<split>][_even].json             a summary
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attribution.common.files import DataFileError, load_npy

PARTIAL = "delete it; rerunning the study recomputes only this query"


def query_file(out: Path, factor: float, qid: int, damping: float | None = None,
               split: str = "test") -> Path:
    """Where the study keeps query ``qid``'s influences at ``factor`` (+ a .json beside);
    ``damping``: None for the configured one, else the damping axis's folder."""
    sub = f"f{factor:g}" if damping is None else f"f{factor:g}-d{damping:g}"
    return Path(out) / sub / f"{split}_{qid}.npy"


def gn_file(study: Path, qid: int, split: str = "test") -> Path:
    """Where query ``qid``'s Gauss–Newton scores live, beside the step study's files."""
    return Path(study) / "gn" / f"{split}_{qid}.npy"


def summary_name(split: str, even: bool = False) -> str:
    """``steps[_<split>][_even].json``: the test split's name carries no split."""
    return ("steps" + ("" if split == "test" else f"_{split}") + ("_even" if even else "")
            + ".json")


def study_dir(out: Path, path: int = 0) -> Path:
    """The one-step study's folder, or the ``path``-step one's inside it."""
    return Path(out) / f"path{path}" if path else Path(out)


def load_row(path: Path, n_items: int) -> tuple[np.ndarray, dict]:
    """One (factor, query) file: float (n_items,) finite influences and its loss record."""
    row = load_npy(path, "A study query's influences", rebuild=PARTIAL)
    meta_path = path.with_suffix(".json")
    if row.shape != (n_items,) or not np.isfinite(row).all() or not meta_path.is_file():
        raise DataFileError(f"{path} holds {row.dtype} {row.shape} (or its .json is missing), "
                            f"expected {n_items} finite influences: {PARTIAL}")
    return row, json.loads(meta_path.read_text())


def ranks_from_rows(paths_of, q: int, n: int) -> np.ndarray:
    """(q, n) rankings, largest first, by the sum of query i's ``paths_of(i)`` rows
    (``load_row``: verified when read) where all of them exist; other rows -1."""
    out = np.full((q, n), -1, dtype=np.int64)
    for i in range(q):
        paths = paths_of(i)
        if all(p.is_file() for p in paths):
            out[i] = np.argsort(-sum(load_row(p, n)[0] for p in paths), kind="stable")
    return out


def gn_ranks(study: Path, q: int, n: int, split: str = "test") -> np.ndarray:
    """(q, n) rankings by GN, largest first; rows of queries not scored are -1."""
    return ranks_from_rows(lambda i: [gn_file(study, i, split)], q, n)
