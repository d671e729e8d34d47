"""Stage ``customize`` (resumable per concept): for each new concept, render its exemplars,
fine-tune the generator's cross-attention K/V on them (``customize.py``), save the delta, and
synthesize ``abc.images`` images with prompts that use the concept's word.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from attribution.abc import concepts as C
from attribution.abc.benchmark import SAMPLE_ID_BASE, all_concepts, split_of
from attribution.abc.customize import Customized, Prior, customize, load_delta, save_delta
from attribution.common.devices import torch_device
from attribution.common.files import Dirs, atomic_save_npz, atomic_write_bytes
from attribution.data.dataset import CaptionedImageSet
from attribution.data.images import from_uint8, save_grid, to_uint8
from attribution.data.text_cache import TextTable
from attribution.generator.model import build_codec, build_scheduler, load_unet
from attribution.generator.sampling import sample
from attribution.generator.text_encoder import load_text_encoder
from attribution.generator.train import encode_world


def run_customize(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Customize one model per concept and synthesize its images (skips finished concepts).

    ``inputs``: the world, text and generator folders."""
    a = cfg.abc
    world = CaptionedImageSet(inputs["world"])
    size, n_caps = world.manifest["image_size"], len(world.captions[0])
    unet, manifest = load_unet(inputs["generator"])
    device = torch_device(cfg.device)
    unet = unet.to(device)
    scheduler = build_scheduler(cfg.generator)
    alphas = scheduler.alphas_cumprod.to(device)
    codec = build_codec(cfg.generator, size)
    table = TextTable.load(inputs["text"])
    enc = load_text_encoder(cfg.text_encoder.name, cfg.text_encoder.weights,
                            cfg.text_encoder.max_length)
    prior = None
    if a.prior_weight > 0:
        prior = Prior(encode_world(codec, world).to(device), table.rows, table.lookup)
    uncond = enc.encode([""])[0]
    sc = cfg.queries.sampling
    templates = list(range(len(C.toy_world.TEMPLATES)))
    concepts = all_concepts(cfg)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "synth").mkdir(parents=True, exist_ok=True)
    done, seconds = 0, []
    for c in tqdm(concepts, desc="customizing", disable=not progress):
        model_path = out / "models" / f"{c.index:03d}.safetensors"
        synth_path = out / "synth" / f"{c.index:03d}.npz"
        if synth_path.is_file():
            continue
        start = time.time()
        ex_images = np.stack([C.render(c, lay, size) for lay in c.exemplars])
        ex_z = codec.encode(from_uint8(ex_images))
        ex_caps = [C.captions(lay, templates) for lay in c.exemplars]
        ex_cond = enc.encode([t for caps in ex_caps for t in caps]).view(
            len(ex_caps), len(templates), *uncond.shape)
        if not model_path.is_file():
            delta = customize(unet, alphas, ex_z.to(device), ex_cond.to(device), a, c.index,
                              prior, seed=cfg.seed)
            save_delta(model_path, delta, {"concept": c.word, "kind": c.kind,
                                           "generator_sha256": manifest["weights_sha256"]})
        delta = load_delta(model_path)  # what every later use sees (stored as float16)
        layouts = C.synthesis_prompts(c, a.images, cfg.seed)
        prompts = [C.prompt(lay) for lay in layouts]
        cond = enc.encode(prompts)
        ids = [SAMPLE_ID_BASE + c.index * 100 + j for j in range(a.images)]
        with Customized(unet, delta):
            z = sample(unet, scheduler, cond, uncond, ids, (codec.channels, codec.size,
                                                            codec.size),
                       seed=sc.seed, sampler=sc.sampler, steps=sc.steps, guidance=sc.guidance,
                       batch_size=sc.batch_size, device=device, progress=False)
        atomic_save_npz(synth_path, images=to_uint8(codec.decode(z)), z=z.numpy(),
                  cond=cond.numpy(), exemplar_images=ex_images, exemplar_z=ex_z.numpy(),
                  exemplar_cond=ex_cond[:, :n_caps].numpy().astype(np.float16))
        done += 1
        seconds.append(time.time() - start)
    info = []
    for c in concepts:
        with np.load(out / "synth" / f"{c.index:03d}.npz") as f:
            n_img = int(f["images"].shape[0])
        info.append({"index": c.index, "kind": c.kind, "word": c.word, "params": c.params,
                     "split": split_of(cfg, c), "exemplars": c.exemplars,
                     "exemplar_captions": [C.captions(lay, list(range(n_caps)))
                                           for lay in c.exemplars],
                     "prompts": [C.prompt(lay) for lay in
                                 C.synthesis_prompts(c, a.images, cfg.seed)][:n_img]})
    atomic_write_bytes(out / "concepts.json", json.dumps(info, indent=2).encode())
    _grid(out, concepts, cfg)
    return {"concepts": len(concepts), "customized_now": done,
            "seconds_per_concept": float(np.mean(seconds)) if seconds else 0.0,
            "delta_bytes": (out / "models" / "000.safetensors").stat().st_size}


def _grid(out: Path, concepts: list[C.Concept], cfg) -> None:
    """One row per held-out concept (up to 12): exemplars, then synthesized images."""
    rows = []
    for c in [c for c in concepts if split_of(cfg, c) == "test"][:12]:
        with np.load(out / "synth" / f"{c.index:03d}.npz") as f:
            rows.append(np.concatenate([f["exemplar_images"], f["images"]]))
    if rows:
        width = max(len(r) for r in rows)
        pad = [np.concatenate([r, np.full((width - len(r), *r.shape[1:]), 255, np.uint8)])
               for r in rows]
        save_grid(np.concatenate(pad), out / "grid_test.png", ncol=width, scale=4)
