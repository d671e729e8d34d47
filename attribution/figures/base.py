"""What every figure shares: the non-interactive backend, names and labels, saving."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SEED_KEY = "student.seed"
METHOD_NAMES = {"dtrak": "D-TRAK", "abu_diagonal": "AbU (diagonal Fisher)",
                "whitened": "whitened input (the head's start)"}
LABELS = {
    "student.loss": "learning-to-rank loss",
    "student.feature": "feature space",
    "student.n_queries": "training queries Q",
    "student.p_outside": "probability p of a candidate from outside the K-set",
    "student.m": "candidates kept per query M",
    "student.budget": "pairs budget Q×M",
}


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _num(v) -> float:
    """A table cell as a float (NaN when it is not a number)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
