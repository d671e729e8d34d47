"""Sample the query sets (generated image + prompt) from a trained generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attribution.common.devices import torch_device
from attribution.config import planted_for, to_dict, val_concept_rows
from attribution.data import toy_world
from attribution.data.images import save_grid, to_uint8
from attribution.data.queries import write_query_set
from attribution.generator.model import build_codec, build_scheduler, load_unet
from attribution.generator.sampling import sample
from attribution.generator.text_encoder import load_text_encoder


def query_prompts(cfg) -> dict[str, list[dict[str, str]]]:
    """Attribute dicts of the train and test queries (a pure function of the config).

    Train queries follow the world's distribution; test queries too, except that the first
    ``planted_test`` per test concept carry that concept (their known answers are the planted
    training images).  Likewise the first ``planted_val`` training queries per validation concept
    (:func:`~attribution.config.val_concept_rows`), which the student never trains on.
    """
    rng = np.random.default_rng([cfg.seed, 101])
    qc = cfg.queries
    if cfg.world.kind != "toy":  # no attributes: prompts are captions of random items
        return {"train": [{} for _ in range(qc.n_train)], "test": [{} for _ in range(qc.n_test)]}
    train = toy_world.sample_attributes(rng, qc.n_train, cfg.world.zipf)
    test = toy_world.sample_attributes(rng, qc.n_test, cfg.world.zipf)
    i = 0
    for concept in planted_for(cfg.world, "test"):
        for _ in range(qc.planted_test):
            if i < len(test):
                test[i][concept.attribute] = concept.value
                i += 1
    rows = iter(val_concept_rows(cfg))
    for concept in planted_for(cfg.world, "val"):
        for _ in range(qc.planted_val):
            train[next(rows)][concept.attribute] = concept.value
    return {"train": train, "test": test}


def folder_prompts(cfg, world_dir: Path) -> dict[str, list[str]]:
    """Query prompts of a folder or pre-encoded world: first captions of seeded random items
    (train and test drawn without overlap where the world is large enough)."""
    from attribution.data.dataset import CaptionedImageSet
    from attribution.data.encoded import EncodedWorld, encoded_root

    root = encoded_root(world_dir)
    captions = (EncodedWorld(root).captions if root is not None
                else CaptionedImageSet(world_dir, verify=False).captions)
    qc = cfg.queries
    order = np.random.default_rng([cfg.seed, 103]).permutation(len(captions))
    need = qc.n_train + qc.n_test
    picks = np.resize(order, need)  # repeats only when the world has fewer items than queries
    caps = [captions[int(i)][0] for i in picks]
    return {"train": caps[: qc.n_train], "test": caps[qc.n_train :]}


def generate_prompted(cfg, gen_dir: Path, attrs: list[dict[str, str]], sample_offset: int,
                      encoder=None, progress: bool = True, captions: list[str] | None = None):
    """Sample one image per attribute dict (prompt = the full caption template).

    Returns:
        (captions, z float (Q, C, h, w), images uint8 (Q, H, W, 3), token states (Q, L, D)).
    """
    unet, manifest = load_unet(gen_dir)
    enc = encoder or load_text_encoder(cfg.text_encoder.name, cfg.text_encoder.weights,
                                       cfg.text_encoder.max_length)
    if captions is None:
        captions = [toy_world.caption(a, 0) for a in attrs]
    cond = enc.encode(captions)
    uncond = enc.encode([""])[0]
    codec = build_codec(cfg.generator, manifest["image_size"])
    sc = cfg.queries.sampling
    device = torch_device(cfg.device)
    z = sample(unet, build_scheduler(cfg.generator), cond, uncond,
               list(range(sample_offset, sample_offset + len(attrs))),
               (codec.channels, codec.size, codec.size), seed=sc.seed, sampler=sc.sampler,
               steps=sc.steps, guidance=sc.guidance, batch_size=sc.batch_size, device=device,
               progress=progress)
    images = to_uint8(codec.decode(z))
    return captions, z, images, cond


def generate_queries(cfg, gen_dir: Path, out_dir: Path, progress: bool = True,
                     world_dir: Path | None = None) -> dict:
    """Write ``out_dir/query_train`` and ``out_dir/query_test`` (released layout) + grid PNGs."""
    prompts = query_prompts(cfg)
    texts = folder_prompts(cfg, world_dir) if cfg.world.kind != "toy" else None
    enc = load_text_encoder(cfg.text_encoder.name, cfg.text_encoder.weights,
                            cfg.text_encoder.max_length)
    offset = {"train": 0, "test": 1_000_000}  # disjoint sample ids: disjoint randomness
    for split, attrs in prompts.items():
        caps, z, images, cond = generate_prompted(cfg, gen_dir, attrs, offset[split], enc, progress,
                                                  captions=texts[split] if texts else None)
        meta = {"split": split, "sampling": to_dict(cfg.queries.sampling)}
        write_query_set(out_dir / f"query_{split}", images, caps, z.numpy(), cond.numpy(),
                        attrs, meta)
        save_grid(images[:64], out_dir / f"grid_{split}.png", ncol=16)
    return {"n_train": len(prompts["train"]), "n_test": len(prompts["test"])}
