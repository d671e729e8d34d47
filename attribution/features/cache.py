"""Features extracted once to disk (memory-mapped), with a manifest that guards staleness.

Folder: ``items.npy`` float32 (N, D) — training items (image, first caption);
``query_train.npy`` / ``query_test.npy`` float32 (Q, D) — queries (generated image, prompt);
``manifest.json`` — extractor description, counts, and the hashes of the inputs it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attribution.common.files import (
    DataFileError,
    atomic_save_npy,
    atomic_write_bytes,
    load_npy,
    read_json,
)
from attribution.data.dataset import CaptionedImageSet
from attribution.data.images import from_uint8
from attribution.data.queries import QuerySet


class StaleFeatureCache(DataFileError):
    """A feature cache does not match the extractor or the data it is used with."""


def extract_all(extractor, world: CaptionedImageSet, queries: dict[str, QuerySet], out: Path,
                batch_size: int = 256, jpegs=None, progress: bool = False) -> dict:
    """Extract and write item and query features; returns the manifest.

    Items are read in batches: the world's crops, or — for a COCO world (``jpegs``: a
    ``data.coco.CocoWorld``) and an extractor with its own ``input_size`` — their original
    JPEGs decoded at that size, in the world's row order."""
    out.mkdir(parents=True, exist_ok=True)
    size = extractor.input_size if jpegs is not None else None
    from_jpegs = size is not None and size != world.manifest["image_size"]
    captions = [c[0] for c in world.captions]
    chunks = []
    for s in tqdm(range(0, len(world), batch_size), desc=f"{extractor.name} items",
                  disable=not progress, unit="batch"):
        idx = np.arange(s, min(s + batch_size, len(world)))
        images = (torch.stack([jpegs.jpeg(int(i), size) for i in idx]) if from_jpegs
                  else world.image_tensor(idx))
        chunks.append(extractor.extract(images, captions[s : s + len(idx)], batch_size))
    items = torch.cat(chunks) if chunks else torch.zeros(0, extractor.dim)
    _finite(items.numpy(), extractor, "items")
    atomic_save_npy(out / "items.npy", items.numpy().astype(np.float32))
    counts = {"items": len(world)}
    for split, qs in queries.items():
        imgs = from_uint8(np.stack([qs.image(i) for i in range(len(qs))]))
        feats = extractor.extract(imgs, qs.captions, batch_size)
        _finite(feats.numpy(), extractor, f"query_{split}")
        atomic_save_npy(out / f"query_{split}.npy", feats.numpy().astype(np.float32))
        counts[f"query_{split}"] = len(qs)
    manifest = {"extractor": extractor.describe(), "dim": extractor.dim, "counts": counts,
                "world_sha256": world.manifest["sha256"]["images.npy"],
                "item_images": (f"original JPEGs at {size} px" if from_jpegs else
                                f"the world's {world.manifest['image_size']} px crops")}
    if "ids_sha256" in world.manifest:  # a COCO world: the rows are these COCO ids
        manifest["ids_sha256"] = world.manifest["ids_sha256"]
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def _finite(feats: np.ndarray, extractor, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(feats).all(1))
    if len(bad):
        raise FloatingPointError(f"the {extractor.describe().get('name', '?')} extractor gave "
                                 f"non-finite features for {what} rows {bad[:5].tolist()}: "
                                 "its weights or inputs are broken; nothing was cached")


def load_features(folder: Path, expect_items: int | None = None,
                  expect_name: str | None = None) -> dict[str, np.ndarray]:
    """Memory-map a feature folder; refuse a stale or mismatched one with a clear error."""
    folder = Path(folder)
    hint = "rerun `attribution features CONFIG` (delete the features folder first)"
    manifest = read_json(folder / "manifest.json", "Feature manifest", hint)
    try:
        counts, dim, name = dict(manifest["counts"]), int(manifest["dim"]), \
            manifest["extractor"]["name"]
    except (KeyError, TypeError, ValueError) as err:
        raise DataFileError(f"Feature manifest {folder / 'manifest.json'} lacks {err}. "
                            f"To rebuild it, {hint}.") from err
    if expect_name is not None and name != expect_name:
        raise StaleFeatureCache(f"{folder} holds '{name}' features, expected '{expect_name}'")
    out = {}
    for key, n in counts.items():
        path = folder / f"{key}.npy"
        arr = load_npy(path, "Feature file", mmap=True, rebuild=hint)
        if arr.shape != (n, dim) or arr.dtype != np.float32:
            raise StaleFeatureCache(f"{path} is {arr.dtype} {arr.shape}, its manifest says "
                                    f"float32 {(n, dim)}. To rebuild it, {hint}.")
        out[key] = arr
    if expect_items is not None and counts.get("items") != expect_items:
        raise StaleFeatureCache(f"{folder} has features for {manifest['counts']['items']} items, "
                                f"the training set has {expect_items}")
    return out


def space_dir(features_dir: Path, space: str) -> Path:
    """The cache folder of one feature space inside a features stage's folder."""
    return Path(features_dir) / space.replace("+", "__")
