"""On-disk captioned-image sets and the dataset interface every loader shares.

Layout of a world folder::

    images.npy        uint8 (N, H, W, 3)
    captions.json     list of N lists of captions
    attributes.json   list of N attribute dicts (ground truth; toy world only)
    manifest.json     n_items, image_size, seed, config, sha256 of every file above

An item is ``{"image": float (3, H, W) in [-1, 1], "captions": list[str], "index": int,
"flip": bool}``; ``flip=True`` mirrors the image horizontally (an extra view of the item).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attribution.common.files import (
    DataFileError,
    atomic_save_npy,
    atomic_write_bytes,
    read_json,
    sha256_file,
)

FILES = ("images.npy", "captions.json", "attributes.json")


def write_world(
    root: Path,
    images: np.ndarray,
    captions: list[list[str]],
    attributes: list[dict[str, str]],
    meta: dict[str, Any],
) -> None:
    """Write a captioned-image set and its manifest (the manifest last: it marks completion)."""
    root.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(root / "images.npy", images)
    atomic_write_bytes(root / "captions.json", json.dumps(captions).encode())
    atomic_write_bytes(root / "attributes.json", json.dumps(attributes).encode())
    manifest = dict(meta)
    manifest.update(
        n_items=int(images.shape[0]),
        image_size=int(images.shape[1]),
        sha256={name: sha256_file(root / name) for name in FILES},
    )
    atomic_write_bytes(root / "manifest.json", json.dumps(manifest, indent=2).encode())


def read_manifest(root: Path) -> dict:
    manifest = read_json(Path(root) / "manifest.json", "World manifest",
                         "rerun `attribution world CONFIG` (delete the folder first)")
    if not isinstance(manifest, dict):
        raise DataFileError(f"World manifest is not a mapping: {Path(root) / 'manifest.json'}")
    return manifest


class CaptionedImageSet(Dataset):
    """A world folder as a dataset of items (see module docstring); validated on open.

    Args:
        root: the world folder.
        verify: check every file's sha256 against the manifest (cheap for the toy world).
    """

    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        for name in FILES:
            path = self.root / name
            if not path.is_file():
                raise DataFileError(f"Dataset file missing: {path}")
            if verify and sha256_file(path) != self.manifest["sha256"][name]:
                raise DataFileError(f"Dataset file is corrupt (sha256 differs from manifest): {path}")
        try:
            self.images = np.load(self.root / "images.npy", mmap_mode="r")
            self.captions: list[list[str]] = json.loads((self.root / "captions.json").read_text())
            self.attributes = json.loads((self.root / "attributes.json").read_text())
        except (ValueError, OSError) as err:
            raise DataFileError(f"Could not read dataset in {self.root}: {err}") from err
        n = self.manifest["n_items"]
        if not (self.images.shape[0] == len(self.captions) == len(self.attributes) == n):
            raise DataFileError(f"Dataset files in {self.root} disagree on the number of items")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def image_tensor(self, index: int | np.ndarray, flip: bool = False) -> torch.Tensor:
        """Images as float in [-1, 1], (3, H, W) for an int index or (B, 3, H, W) for an array."""
        arr = np.asarray(self.images[index], dtype=np.float32)
        x = torch.from_numpy(arr).movedim(-1, -3) / 127.5 - 1.0
        return torch.flip(x, dims=[-1]) if flip else x

    def all_images(self) -> torch.Tensor:
        """Every image as float (N, 3, H, W) in [-1, 1]."""
        return self.image_tensor(np.arange(len(self)))

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def get(self, index: int, flip: bool = False) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for a set of {len(self)}")
        return {
            "image": self.image_tensor(index, flip),
            "captions": list(self.captions[index]),
            "index": int(index),
            "flip": bool(flip),
        }
