"""Cache of frozen text-encoder token states for every distinct caption of a world.

Row 0 is always the empty prompt (the unconditional input for classifier-free guidance).
Files: ``embeddings.npy`` float16 (U, L, D), ``caption_rows.npy`` int32 (N, C) — row of each
item's c-th caption — ``texts.json`` (the U distinct texts) and ``manifest.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from attribution.common.files import (
    DataFileError,
    atomic_save_npy,
    atomic_write_bytes,
    load_npy,
    read_json,
)
from attribution.data.encoded import EncodedWorld, ItemCaptionStates

_HINT = "rerun `attribution text CONFIG` (delete the folder first)"


class TextTable:
    """Token states of distinct captions, looked up by row.

    Attributes:
        embeddings: float16 (U, L, D).
        rows: int64 (N, C) row of caption c of item n.
        texts: the U distinct texts; texts[0] == "".
    """

    def __init__(self, embeddings: torch.Tensor, rows: torch.Tensor, texts: list[str],
                 source: str = ""):
        self.embeddings, self.rows, self.texts, self.source = embeddings, rows, texts, source
        self._index = {t: i for i, t in enumerate(texts)}

    def lookup(self, row_ids: torch.Tensor) -> torch.Tensor:
        """float32 (..., L, D) for integer row ids of any shape."""
        return self.embeddings[row_ids].float()

    def row_of(self, text: str) -> int | None:
        return self._index.get(text)

    @property
    def uncond(self) -> torch.Tensor:
        return self.embeddings[0].float()

    @classmethod
    def build(cls, encoder, captions: list[list[str]], batch_size: int = 256) -> TextTable:
        texts = [""] + sorted({c for caps in captions for c in caps} - {""})
        index = {t: i for i, t in enumerate(texts)}
        emb = encoder.encode(texts, batch_size=batch_size).to(torch.float16)
        if not torch.isfinite(emb).all():
            raise ValueError("text encoder produced non-finite token states")
        rows = torch.tensor([[index[c] for c in caps] for caps in captions], dtype=torch.long)
        return cls(emb, rows, texts, encoder.source)

    def save(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(root / "embeddings.npy", self.embeddings.numpy())
        atomic_save_npy(root / "caption_rows.npy", self.rows.numpy().astype(np.int32))
        atomic_write_bytes(root / "texts.json", json.dumps(self.texts).encode())
        meta = {"source": self.source, "shape": list(self.embeddings.shape),
                "n_items": int(self.rows.shape[0])}
        atomic_write_bytes(root / "manifest.json", json.dumps(meta, indent=2).encode())

    @classmethod
    def load(cls, root: Path) -> TextTable:
        root = Path(root)
        pointer = root / "manifest.json"
        if pointer.is_file():
            meta = read_json(pointer, "Text-embedding cache manifest", _HINT)
            if isinstance(meta, dict) and "encoded_root" in meta:  # a pre-encoded world's token states, memory-mapped
                return encoded_table(EncodedWorld(meta["encoded_root"]))
        for name in ("manifest.json", "embeddings.npy", "caption_rows.npy", "texts.json"):
            if not (root / name).is_file():
                raise DataFileError(f"Text-embedding cache file missing: {root / name}")
        meta = read_json(root / "manifest.json", "Text-embedding cache manifest", _HINT)
        emb = torch.from_numpy(load_npy(root / "embeddings.npy", "Text embeddings", rebuild=_HINT))
        if not isinstance(meta, dict) or list(emb.shape) != meta.get("shape"):
            raise DataFileError(f"Text-embedding cache is corrupt: {root / 'embeddings.npy'} "
                                f"does not match its manifest. To rebuild it, {_HINT}.")
        rows = load_npy(root / "caption_rows.npy", "Caption rows", rebuild=_HINT)
        texts = read_json(root / "texts.json", "Caption texts", _HINT)
        if rows.dtype.kind not in "iu" or rows.ndim != 2 or (
                rows.size and not 0 <= rows.min() <= rows.max() < len(emb)):
            raise DataFileError(f"Caption rows {root / 'caption_rows.npy'} do not index the "
                                f"{len(emb)} embeddings. To rebuild them, {_HINT}.")
        return cls(emb, torch.from_numpy(rows.astype(np.int64)), texts, meta.get("source", ""))


def encoded_table(world: EncodedWorld) -> TextTable:
    """A pre-encoded world's caption token states as a table over its memory map: row 0 the
    empty prompt, then item i's caption c at row 1 + i·C + c."""
    n, c = world.states.shape[:2]
    rows = 1 + torch.arange(n * c, dtype=torch.long).view(n, c)
    return TextTable(ItemCaptionStates(world.states, world.uncond), rows, [""],
                     world.manifest.get("text_encoder", ""))


def text_encoded_root(text_dir: Path | None) -> Path | None:
    """The pre-encoded folder a text stage points at (its token states), or None."""
    if text_dir is None or not (Path(text_dir) / "manifest.json").is_file():
        return None
    meta = read_json(Path(text_dir) / "manifest.json", "Text-embedding cache manifest", _HINT)
    return Path(meta["encoded_root"]) if isinstance(meta, dict) and "encoded_root" in meta \
        else None
