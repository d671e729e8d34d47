"""The released MSCOCO attribution data (docs/method.md §6): find it, check it, say what is missing.

Layout under the data root (``data.root``, else the environment variable
``ATTRIBUTION_DATA_ROOT``)::

    feats/{dino,clip,clip_text,dino+clip_text}/{data_feats,train_query_feats,test_query_feats}.npy
    influence_train.pkl    {'random': {'rank': (Q_train, K) ids, most influential first,
                                       'influence_subset': (Q_train, K),
                                       'rank_influence_subset': (Q_train, K)}}
    influence_test.pkl     {'random': {'influence': (Q_test, N), 'rank': (Q_test, N)}}

The student trains and evaluates on these directly: no generator, no teacher run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from attribution.common.files import DataFileError, load_npy

ENV_ROOT = "ATTRIBUTION_DATA_ROOT"


def data_root(cfg) -> Path:
    """The released data root: ``data.root``, else ``$ATTRIBUTION_DATA_ROOT``."""
    root = cfg.data.root or os.environ.get(ENV_ROOT)
    if not root:
        raise DataFileError(f"data.source=released needs the data root: set data.root=PATH or "
                            f"the environment variable {ENV_ROOT}")
    return Path(root).expanduser()


def required_files(spaces: list[str]) -> list[str]:
    """Paths (relative to the root) the student needs for these feature spaces."""
    files = [f"feats/{s}/{name}" for s in spaces for name in RELEASED_FILES.values()]
    return files + ["influence_train.pkl", "influence_test.pkl"]


def check_released(root: Path, spaces: list[str]) -> None:
    """Fail with ONE error that lists every missing file (not just the first)."""
    root = Path(root)
    if not root.is_dir():
        raise DataFileError(f"released data root {root} does not exist (data.root / ${ENV_ROOT})")
    missing = [f for f in required_files(spaces) if not (root / f).is_file()]
    if missing:
        listing = "\n  ".join(missing)
        raise DataFileError(f"released data under {root} is incomplete; missing "
                            f"{len(missing)} file(s):\n  {listing}\n(the layout is described in "
                            f"attribution/data/released.py and README 'Running at scale')")


RELEASED_FILES = {"items": "data_feats.npy", "query_train": "train_query_feats.npy",
                  "query_test": "test_query_feats.npy"}


def load_released_features(feats_root: Path, space: str) -> dict[str, np.ndarray]:
    """The released features of one space (docs/method.md §6): ``feats/<space>/data_feats.npy`` (training
    items), ``train_query_feats.npy`` and ``test_query_feats.npy``, float32, memory-mapped."""
    folder = Path(feats_root) / space
    missing = [str(folder / f) for f in RELEASED_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise DataFileError("Released feature files missing: " + ", ".join(missing))
    out = {}
    for key, name in RELEASED_FILES.items():
        arr = load_npy(folder / name, "Released feature file", mmap=True)
        if arr.ndim != 2 or arr.dtype.kind != "f" or 0 in arr.shape:
            raise DataFileError(f"{folder / name} must be a 2-D float array, got "
                                f"{arr.dtype} {arr.shape}")
        out[key] = arr
    dims = {k: a.shape[1] for k, a in out.items()}
    if len(set(dims.values())) != 1:
        raise DataFileError(f"Released '{space}' features disagree on the dimension: {dims}")
    return out
