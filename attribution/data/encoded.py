"""A pre-encoded world: the folder ``attribution coco-encode`` writes, used in place of images.

At MSCOCO scale the training set is only ever seen through the VAE and the text encoder, so the
generator, the Fisher and the teacher read it pre-encoded:

- ``latents.npy`` float32 (N, 2, C, h, w): view 0 = the image, view 1 = its horizontal mirror
  (each VAE posterior sampled once and scaled).  118,287 × 2 × 4 × 16 × 16 × 4 B = 0.97 GB: held
  in memory.
- ``text_embeddings.npy`` float16 (N, n_captions, L, D): every caption's token states.  At SD-2's
  77 × 1024 that is 93 GB for COCO: memory-mapped, read per batch.
- ``uncond.npy`` float16 (L, D): the empty prompt's token states (classifier-free guidance).
- ``captions.json`` (N lists of captions), ``ids.json``, ``manifest.json`` (written last).

``text_cache.encoded_table(world)`` is a ``TextTable`` over the memory map: row 0 = the empty
prompt,
row 1 + n·n_captions + c = caption c of item n, so every consumer of a ``TextTable`` (the
generator's training step, the teacher's candidate losses, the Fisher) works unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from attribution.common.files import DataFileError

FILES = ("manifest.json", "latents.npy", "text_embeddings.npy", "uncond.npy", "captions.json")


class ItemCaptionStates:
    """Token states addressed by ``TextTable`` row ids over (N, n_captions, L, D) storage.

    Indexing with a tensor of rows returns float16 (..., L, D), read from the memory map.
    Pickling (spawned ranks, data-loader workers) carries the file's path, not its 93 GB.
    """

    def __init__(self, states: np.ndarray, uncond: np.ndarray):
        self.states, self.uncond = states, uncond
        n, self.n_captions, length, dim = states.shape
        self.shape = (1 + n * self.n_captions, length, dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.states, np.memmap):
            state["states"] = str(self.states.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["states"], str):
            state["states"] = np.load(state["states"], mmap_mode="r")
        self.__dict__.update(state)

    def __getitem__(self, rows) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long)
        flat = rows.reshape(-1).numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"caption rows must lie in [0, {self.shape[0]})")
        out = np.empty((flat.size, *self.shape[1:]), dtype=np.float16)
        empty = flat == 0
        out[empty] = self.uncond
        r = flat[~empty] - 1
        if r.size:
            order = np.argsort(r, kind="stable")  # sequential reads from the memory map
            got = self.states[r[order] // self.n_captions, r[order] % self.n_captions]
            filled = np.empty_like(got)
            filled[order] = got
            out[~empty] = filled
        return torch.from_numpy(out).view(*rows.shape, *self.shape[1:])


class EncodedWorld:
    """A ``coco-encode`` folder, validated on open (one error lists every missing file)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        missing = [str(self.root / f) for f in FILES if not (self.root / f).is_file()]
        if missing:
            hint = (" (an encoding that stopped part-way: rerun `attribution coco-encode` with the "
                    "same arguments, it resumes)" if (self.root / "progress.json").is_file()
                    else "")
            raise DataFileError("pre-encoded world is incomplete, missing: " + ", ".join(missing)
                                + hint)
        try:
            self.manifest = json.loads((self.root / "manifest.json").read_text())
            self.latents = np.load(self.root / "latents.npy", mmap_mode="r")
            self.states = np.load(self.root / "text_embeddings.npy", mmap_mode="r")
            self.uncond = np.load(self.root / "uncond.npy")
            self.captions: list[list[str]] = json.loads((self.root / "captions.json").read_text())
        except (ValueError, OSError) as err:
            raise DataFileError(f"could not read the pre-encoded world in {self.root}: {err}") \
                from err
        n = self.manifest["n_items"]
        if (list(self.latents.shape) != self.manifest["latents"]
                or list(self.states.shape) != self.manifest["text_embeddings"]
                or self.latents.ndim != 5 or len(self.captions) != n
                or self.latents.shape[0] != n or self.states.shape[0] != n
                or tuple(self.uncond.shape) != tuple(self.states.shape[2:])):
            raise DataFileError(
                f"pre-encoded world {self.root} is inconsistent: latents {self.latents.shape}, "
                f"text_embeddings {self.states.shape}, uncond {self.uncond.shape}, "
                f"{len(self.captions)} caption lists, manifest says {n} items")

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def fingerprint(self) -> str:
        """Identifies the encoding (its manifest and the arrays' sizes), cheaply."""
        h = hashlib.sha256((self.root / "manifest.json").read_bytes())
        for f in FILES[1:]:
            h.update(str((self.root / f).stat().st_size).encode())
        return h.hexdigest()

    def latents_tensor(self) -> torch.Tensor:
        """float32 (N, 2, C, h, w), in memory."""
        return torch.from_numpy(np.array(self.latents, dtype=np.float32))  # a copy: writable


def encoded_root(world_dir: Path) -> Path | None:
    """The pre-encoded folder a world stage points at, or None for an image world."""
    from attribution.data.dataset import read_manifest

    m = read_manifest(world_dir)
    return Path(m["encoded_root"]) if m.get("kind") == "encoded" else None
