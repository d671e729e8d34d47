"""Stages ``encode`` (a COCO world's latents and token states, as ``coco-encode`` writes them),
``text`` (every caption through the frozen text encoder, cached), ``generator``
(trained here, or released / pretrained weights loaded and checked) and ``queries`` (the train /
test query sets sampled from the generator, in the released layout)."""

from __future__ import annotations

import json
from pathlib import Path

from attribution.common.files import DataFileError, Dirs, atomic_write_bytes
from attribution.config import ConfigError, to_dict
from attribution.data.dataset import CaptionedImageSet, read_manifest
from attribution.data.text_cache import TextTable
from attribution.generator.model import (
    build_codec,
    load_pretrained_unet,
    load_unet_weights,
    save_generator,
)
from attribution.generator.queries import generate_queries
from attribution.generator.text_encoder import load_text_encoder
from attribution.generator.train import train_generator


def run_encode(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """A COCO world (``inputs["world"]``) encoded as ``attribution coco-encode`` would: every
    item's two views through the generator's codec (the VAE's posterior sample, or the pixels
    themselves for the pixel codec) and every caption's token states, in the world's row order
    (its COCO ids, copied and checked).  ``out`` is then a pre-encoded world the text, generator,
    Fisher and teacher stages read like ``world.kind=encoded``."""
    from attribution.common.devices import torch_device
    from attribution.data.coco import CocoWorld, encode_coco

    world = CocoWorld(inputs["world"])
    codec = build_codec(cfg.generator, world.size)
    vae = getattr(codec, "vae", None)
    if vae is not None:
        vae.to(torch_device(cfg.device))
    t = cfg.text_encoder
    enc = load_text_encoder(t.name, t.weights, t.max_length)
    manifest = encode_coco(world, vae, enc, out, codec.scale if vae is not None else None,
                           cfg.seed, progress=progress)
    if json.loads((out / "ids.json").read_text()) != world.ids:
        raise DataFileError(f"the encoding in {out} lists other COCO ids than its world "
                            f"{inputs['world']}: delete {out} and rerun")
    return {"items": manifest["n_items"], "codec": manifest["codec"],
            "latents": manifest["latents"][1:], "token_states": manifest["text_embeddings"][2:]}


def run_text(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Encode every caption of the world (``inputs["world"]``); for a pre-encoded world (or a
    COCO world's ``encode`` stage), check the encoder matches and point at its token states."""
    t = cfg.text_encoder
    enc = load_text_encoder(t.name, t.weights, t.max_length)
    world_manifest = read_manifest(inputs["world"])
    if world_manifest.get("kind") == "coco":
        root = str(inputs["encode"])
        made = json.loads((inputs["encode"] / "manifest.json").read_text())
        world_manifest = {**world_manifest, "text_encoder": made["text_encoder"],
                          "token_length": made["text_embeddings"][2], "encoded_root": root}
    if "encoded_root" in world_manifest:  # token states exist: point at them
        if enc.source != world_manifest["text_encoder"]:
            raise ConfigError(
                f"text_encoder ({enc.source}) is not the encoder the pre-encoded world was "
                f"made with ({world_manifest['text_encoder']}): queries would be encoded "
                "differently from the training captions")
        if t.max_length != world_manifest["token_length"]:
            raise ConfigError(f"text_encoder.max_length={t.max_length} but the pre-encoded "
                              f"captions have {world_manifest['token_length']} tokens")
        root = world_manifest["encoded_root"]
        atomic_write_bytes(out / "manifest.json", json.dumps(
            {"encoded_root": root, "source": enc.source}, indent=2).encode())
        table = TextTable.load(out)
        return {"distinct_texts": int(table.embeddings.shape[0]),
                "dim": int(table.embeddings.shape[-1]), "memory_mapped": True}
    world = CaptionedImageSet(inputs["world"])
    table = TextTable.build(enc, world.captions, t.batch_size)
    table.save(out)
    return {"distinct_texts": len(table.texts), "dim": int(table.embeddings.shape[-1])}


def run_generator(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Train (or resume) the UNet on the world and its caption states; with
    ``generator.weights`` / ``generator.pretrained``, load, check and save those instead."""
    g = cfg.generator
    if not (g.weights or g.pretrained):
        return train_generator(cfg, inputs["world"], inputs["text"], out, progress)
    world_manifest = read_manifest(inputs["world"])
    size = world_manifest["image_size"]
    codec = build_codec(g, size)
    source = g.weights or g.pretrained
    unet = (load_unet_weights(g, codec, g.weights) if g.weights
            else load_pretrained_unet(g, codec, g.pretrained))
    save_generator(out, unet, {"config": to_dict(g), "world": world_manifest["sha256"],
                               "source": str(Path(source).resolve()), "steps": 0,
                               "image_size": size, "excluded": []})
    return {"loaded": str(source), "params": sum(p.numel() for p in unet.parameters())}


def run_queries(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Sample the query sets from the generator (``inputs["generator"]``, ``["world"]``)."""
    return generate_queries(cfg, inputs["generator"], out, progress, inputs["world"])
