"""Stages ``toyclip`` (the toy world's small CLIP) and ``features`` (every ``features.spaces``
entry extracted for items and queries, cached)."""

from __future__ import annotations

from pathlib import Path

from attribution.common.files import Dirs
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.features.cache import extract_all, space_dir
from attribution.features.extractors import build_extractor, feature_context
from attribution.features.toyclip import train_toyclip


def run_toyclip(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Train the toy CLIP on the world's (image, caption) pairs."""
    f = cfg.features
    return train_toyclip(CaptionedImageSet(inputs["world"]), out, f.toyclip_steps,
                         f.toyclip_batch_size, f.toyclip_lr, f.toyclip_width,
                         f.toyclip_embed_dim, cfg.seed, progress)


def run_features(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Extract every feature space for the world's items and both query sets."""
    f = cfg.features
    world = CaptionedImageSet(inputs["world"])
    jpegs = coco_rows(inputs) if world.manifest.get("kind") == "coco" else None
    queries = {s: QuerySet(inputs["queries"] / f"query_{s}") for s in ("train", "test")}
    ctx = feature_context(f, inputs["toyclip"], world.manifest["image_size"])
    dims = {}
    for space in f.spaces:
        extractor = build_extractor(space, ctx, f.l2_per_block)
        dims[space] = extract_all(extractor, world, queries, space_dir(out, space),
                                  f.batch_size, jpegs, progress)["dim"]
    return {"spaces": len(dims), "dims": dims}


def coco_rows(inputs: Dirs):
    """A COCO world's items (``data.coco.CocoWorld``), its row order checked against the
    encoding the teacher scored (the features' row i must be the teacher's item i)."""
    import json

    from attribution.common.files import DataFileError
    from attribution.data.coco import CocoWorld

    world = CocoWorld(inputs["world"])
    encoded = json.loads((inputs["encode"] / "ids.json").read_text())
    if encoded != world.ids:
        raise DataFileError(f"the COCO ids of {inputs['encode']} (the teacher's rows) are not "
                            f"those of {inputs['world']} in the same order: rerun the encode "
                            "stage (delete its folder)")
    return world
