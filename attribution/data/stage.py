"""Stage ``world``: the training set, generated (toy), read from an image–caption folder or a
raw MSCOCO folder, or pointed at (a pre-encoded MSCOCO folder: validated, not copied)."""

from __future__ import annotations

import json
from pathlib import Path

from attribution.common.files import Dirs, atomic_write_bytes, sha256_file
from attribution.common.plain import to_dict
from attribution.data import toy_world
from attribution.data.dataset import write_world
from attribution.data.encoded import EncodedWorld
from attribution.data.folder import read_image_caption_data


def run_world(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Write the world's images, captions, attributes and manifest into ``out`` (no inputs)."""
    w = cfg.world
    if w.kind == "encoded":
        enc = EncodedWorld(w.root)
        manifest = {"kind": "encoded", "encoded_root": str(enc.root.resolve()),
                    "n_items": len(enc), "image_size": enc.manifest["image_size"],
                    "captions_per_item": int(enc.states.shape[1]),
                    "text_encoder": enc.manifest.get("text_encoder", ""),
                    "scale": enc.manifest["scale"], "token_length": int(enc.states.shape[2]),
                    "sha256": {"encoding": enc.fingerprint()}, "seed": cfg.seed}
        atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
        return {"items": len(enc), "captions": len(enc) * manifest["captions_per_item"],
                "latents": list(enc.latents.shape[1:])}
    if w.kind == "coco":
        from attribution.data.coco import read_coco_world

        ds, images = read_coco_world(w.root, w.image_size, w.captions_per_item, w.n_items,
                                     progress)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "ids.json", json.dumps(ds.ids).encode())
        atomic_write_bytes(out / "files.json", json.dumps(ds.files).encode())
        write_world(out, images, ds.captions, [{} for _ in ds.captions],
                    {"kind": "coco", "config": to_dict(w), "seed": cfg.seed,
                     "source": str(Path(w.root).expanduser().resolve()),
                     "captions_per_item": w.captions_per_item,
                     "ids_sha256": sha256_file(out / "ids.json")})
        return {"items": len(ds), "captions": len(ds) * w.captions_per_item,
                "first_id": ds.ids[0], "last_id": ds.ids[-1]}
    if w.kind == "folder":
        images, caps = read_image_caption_data(w.root, w.image_size, w.captions_per_item,
                                               w.n_items)
        write_world(out, images, caps, [{} for _ in caps],
                    {"config": to_dict(w), "seed": cfg.seed,
                     "source": str(Path(w.root).expanduser().resolve())})
        return {"items": len(caps), "captions": sum(len(c) for c in caps)}
    images, caps, attrs = toy_world.generate_world(
        w.n_items, w.image_size, w.captions_per_item, w.zipf,
        [to_dict(p) for p in w.planted], cfg.seed)
    write_world(out, images, caps, attrs, {"config": to_dict(w), "seed": cfg.seed})
    return {"items": len(caps), "captions": sum(len(c) for c in caps)}
