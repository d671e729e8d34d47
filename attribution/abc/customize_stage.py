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


class _Setup:
    """What every concept's customization shares: the generator, its schedule and codec, the
    text encoder, the prior (training items) and the sampling settings."""

    def __init__(self, cfg, inputs: Dirs):
        self.cfg, a = cfg, cfg.abc
        self.world = CaptionedImageSet(inputs["world"])
        size = self.world.manifest["image_size"]
        self.unet, self.manifest = load_unet(inputs["generator"])
        self.device = torch_device(cfg.device)
        self.unet = self.unet.to(self.device)
        self.scheduler = build_scheduler(cfg.generator)
        self.alphas = self.scheduler.alphas_cumprod.to(self.device)
        self.codec = build_codec(cfg.generator, size)
        table = TextTable.load(inputs["text"])
        self.enc = load_text_encoder(cfg.text_encoder.name, cfg.text_encoder.weights,
                                     cfg.text_encoder.max_length)
        self.prior = None
        if a.prior_weight > 0:
            self.prior = Prior(encode_world(self.codec, self.world).to(self.device), table.rows,
                               table.lookup)
        self.uncond = self.enc.encode([""])[0]
        self.templates = list(range(len(C.toy_world.TEMPLATES)))

    def one(self, c: C.Concept, model_path: Path, synth_path: Path) -> None:
        """Customize on ``c``'s exemplars (unless its delta is saved) and synthesize."""
        a, sc, codec, size = self.cfg.abc, self.cfg.queries.sampling, self.codec, self.codec.size
        ex_images = np.stack([C.render(c, lay, self.world.manifest["image_size"])
                              for lay in c.exemplars])
        ex_z = codec.encode(from_uint8(ex_images))
        ex_caps = [C.captions(lay, self.templates) for lay in c.exemplars]
        ex_cond = self.enc.encode([t for caps in ex_caps for t in caps]).view(
            len(ex_caps), len(self.templates), *self.uncond.shape)
        if not model_path.is_file():
            delta = customize(self.unet, self.alphas, ex_z.to(self.device),
                              ex_cond.to(self.device), a, c.index, self.prior,
                              seed=self.cfg.seed)
            save_delta(model_path, delta, {"concept": c.word, "kind": c.kind,
                                           "generator_sha256": self.manifest["weights_sha256"]})
        delta = load_delta(model_path)  # what every later use sees (stored as float16)
        cond = self.enc.encode([C.prompt(lay) for lay in
                                C.synthesis_prompts(c, a.images, self.cfg.seed)])
        ids = [SAMPLE_ID_BASE + c.index * 100 + j for j in range(a.images)]
        with Customized(self.unet, delta):
            z = sample(self.unet, self.scheduler, cond, self.uncond, ids,
                       (codec.channels, size, size), seed=sc.seed, sampler=sc.sampler,
                       steps=sc.steps, guidance=sc.guidance, batch_size=sc.batch_size,
                       device=self.device, progress=False)
        n_caps = len(self.world.captions[0])
        atomic_save_npz(synth_path, images=to_uint8(codec.decode(z)), z=z.numpy(),
                        cond=cond.numpy(), exemplar_images=ex_images, exemplar_z=ex_z.numpy(),
                        exemplar_cond=ex_cond[:, :n_caps].numpy().astype(np.float16))


def _concept_info(cfg, out: Path, concepts: list[C.Concept], n_caps: int) -> list[dict]:
    info = []
    for c in concepts:
        with np.load(out / "synth" / f"{c.index:03d}.npz") as f:
            n_img = int(f["images"].shape[0])
        info.append({"index": c.index, "kind": c.kind, "word": c.word, "params": c.params,
                     "split": split_of(cfg, c), "exemplars": c.exemplars,
                     "exemplar_captions": [C.captions(lay, list(range(n_caps)))
                                           for lay in c.exemplars],
                     "prompts": [C.prompt(lay) for lay in
                                 C.synthesis_prompts(c, cfg.abc.images, cfg.seed)][:n_img]})
    return info


def run_customize(cfg, inputs: Dirs, out: Path, progress: bool = True) -> dict:
    """Customize one model per concept and synthesize its images (skips finished concepts).

    ``inputs``: the world, text and generator folders."""
    setup = _Setup(cfg, inputs)
    concepts = all_concepts(cfg)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "synth").mkdir(parents=True, exist_ok=True)
    done, seconds = 0, []
    for c in tqdm(concepts, desc="customizing", disable=not progress):
        synth_path = out / "synth" / f"{c.index:03d}.npz"
        if synth_path.is_file():
            continue
        start = time.time()
        setup.one(c, out / "models" / f"{c.index:03d}.safetensors", synth_path)
        done += 1
        seconds.append(time.time() - start)
    info = _concept_info(cfg, out, concepts, len(setup.world.captions[0]))
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
