"""Query sets in the released layout (docs/method.md §6)::

    query_{train,test}/images/{i}.png   the generated image
    query_{train,test}/captions.txt     one prompt per line
    query_{train,test}/latents.npy      float32 (Q, C, h, w) model-space sample
    query_{train,test}/text_embeddings.npy  float32 (Q, L, D) prompt token states
    query_{train,test}/attributes.json  prompted ground-truth attributes (toy world; optional)
    query_{train,test}/manifest.json    count and provenance (ours; optional for released data)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from attribution.common.files import (
    DataFileError,
    atomic_save_npy,
    atomic_write_bytes,
    load_npy,
    read_json,
)


def write_query_set(root: Path, images: np.ndarray, captions: list[str], latents: np.ndarray,
                    text_embeddings: np.ndarray, attributes: list[dict] | None = None,
                    meta: dict | None = None) -> None:
    n = len(captions)
    if not (images.shape[0] == latents.shape[0] == text_embeddings.shape[0] == n):
        raise ValueError("images, captions, latents and text embeddings disagree on the count")
    if any("\n" in c for c in captions):
        raise ValueError("a caption contains a newline; captions.txt holds one per line")
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(images[i]).save(root / "images" / f"{i}.png")
    atomic_write_bytes(root / "captions.txt", ("\n".join(captions) + "\n").encode())
    atomic_save_npy(root / "latents.npy", latents.astype(np.float32))
    atomic_save_npy(root / "text_embeddings.npy", text_embeddings.astype(np.float32))
    if attributes is not None:
        atomic_write_bytes(root / "attributes.json", json.dumps(attributes).encode())
    atomic_write_bytes(root / "manifest.json", json.dumps(dict(meta or {}, n=n), indent=2).encode())


STUDY_SPLITS = ("test", "val")


def study_query_set(split: str) -> str:
    """The query set a study's ``split`` reads: ``test`` the test queries (for reporting),
    ``val`` the training queries (for choosing: no test query is read).  ValueError otherwise."""
    if split not in STUDY_SPLITS:
        raise ValueError(f"split {split!r}: one of {STUDY_SPLITS}")
    return "test" if split == "test" else "train"


_HINT = "rerun `attribution queries CONFIG` (delete the folder first)"


class QuerySet:
    """A query folder in the released layout; checks every file it needs on open.

    Attributes:
        captions: Q prompts.  latents: float32 (Q, C, h, w).  text_embeddings: float32 (Q, L, D)
        or None if absent.  attributes: list of dicts or None.
    """

    def __init__(self, root: str | Path, need_embeddings: bool = False):
        self.root = Path(root)
        cap_path = self.root / "captions.txt"
        if not cap_path.is_file():
            raise DataFileError(f"Query captions missing: {cap_path}")
        self.captions = cap_path.read_text().rstrip("\n").split("\n")
        lat_path = self.root / "latents.npy"
        if not lat_path.is_file():
            raise DataFileError(f"Query latents missing: {lat_path}")
        self.latents = load_npy(lat_path, "Query latents", rebuild=_HINT)
        if self.latents.shape[0] != len(self.captions):
            raise DataFileError(f"{lat_path} has {self.latents.shape[0]} rows but "
                                f"{cap_path} has {len(self.captions)} captions")
        emb_path = self.root / "text_embeddings.npy"
        self.text_embeddings = (load_npy(emb_path, "Query text embeddings", rebuild=_HINT)
                                if emb_path.is_file() else None)
        if need_embeddings and self.text_embeddings is None:
            raise DataFileError(f"Query text embeddings missing: {emb_path}")
        if self.text_embeddings is not None and self.text_embeddings.shape[0] != len(self):
            raise DataFileError(f"{emb_path} has {self.text_embeddings.shape[0]} rows, "
                                f"expected {len(self)}")
        attr_path = self.root / "attributes.json"
        self.attributes = (read_json(attr_path, "Query attributes", _HINT)
                           if attr_path.is_file() else None)

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, i: int) -> np.ndarray:
        path = self.root / "images" / f"{i}.png"
        if not path.is_file():
            raise DataFileError(f"Query image missing: {path}")
        return np.asarray(Image.open(path).convert("RGB"))
