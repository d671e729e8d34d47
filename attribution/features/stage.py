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
    queries = {s: QuerySet(inputs["queries"] / f"query_{s}") for s in ("train", "test")}
    ctx = feature_context(f, inputs["toyclip"], world.manifest["image_size"])
    dims = {}
    for space in f.spaces:
        extractor = build_extractor(space, ctx, f.l2_per_block)
        dims[space] = extract_all(extractor, world, queries, space_dir(out, space),
                                  f.batch_size)["dim"]
    return {"spaces": len(dims), "dims": dims}
