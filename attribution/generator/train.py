"""Train the generator on a world: an importable entry point (``train_generator``)."""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from attribution.common.devices import accelerator_for
from attribution.common.files import DataFileError
from attribution.config import to_dict
from attribution.data.dataset import CaptionedImageSet, read_manifest
from attribution.data.text_cache import TextTable
from attribution.generator.model import build_codec, build_scheduler, build_unet, save_generator
from attribution.generator.module import GeneratorModule, StepDataset

log = logging.getLogger(__name__)

# generator.train.precision -> Lightning's: autocast with float32 master weights (and, for
# fp16, loss scaling); the saved weights are float32 whichever is used
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def encode_world(codec, world: CaptionedImageSet, batch_size: int = 256) -> torch.Tensor:
    """Model-space tensors (N, C, h, w) of every item (pixels for the pixel codec)."""
    chunks = []
    for s in range(0, len(world), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(world))).numpy()
        chunks.append(codec.encode(world.image_tensor(idx)))
    return torch.cat(chunks)


def world_latents(codec, world_dir: Path, text_dir: Path | None = None
                  ) -> tuple[torch.Tensor, dict]:
    """(model-space training items, the world stage's manifest).

    An image world is encoded here: (N, C, h, w).  A pre-encoded world (``world.kind=encoded``,
    or a COCO world whose text stage ``text_dir`` points at its ``encode`` stage) gives its
    stored views: (N, 2, C, h, w), checked against the codec's latent shape."""
    from attribution.data.encoded import EncodedWorld
    from attribution.data.text_cache import text_encoded_root

    manifest = read_manifest(world_dir)  # read once: the kind says where the latents are
    kind = manifest.get("kind")
    root = (Path(manifest["encoded_root"]) if kind == "encoded"
            else text_encoded_root(text_dir) if kind == "coco" else None)
    if root is None and kind == "coco":
        raise ValueError(f"a COCO world's latents are its encode stage's, and the text stage "
                         f"{text_dir} does not point at one: rerun its text stage")
    if root is None:
        world = CaptionedImageSet(world_dir)
        return encode_world(codec, world), world.manifest
    encoding = EncodedWorld(root)
    scale = encoding.manifest["scale"]
    if encoding.manifest.get("codec", "vae") == "pixel":
        if hasattr(codec, "scale"):
            raise ValueError(f"the world in {root} was encoded as pixels but the generator's "
                             "codec is the VAE: set generator.codec=pixel")
    elif not abs(scale - getattr(codec, "scale", float("nan"))) <= 1e-9:  # nan: pixels
        raise ValueError(f"the latents were encoded with scale {scale} but "
                         f"the generator's codec has {getattr(codec, 'scale', 'none (pixels)')}: set "
                         "generator.codec=vae and generator.latent_scale to match")
    latents = encoding.latents_tensor()
    want = (codec.channels, codec.size, codec.size)
    if tuple(latents.shape[-3:]) != want:
        raise ValueError(f"pre-encoded latents are {tuple(latents.shape[-3:])} per item but the "
                         f"generator's codec ({codec.__class__.__name__}) works on {want}: "
                         "set generator.codec=vae and generator.vae_path to the encoding's VAE")
    return latents, manifest


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest readable checkpoint to resume from: ``last.ckpt``, else ``latest.ckpt`` (the
    same epoch's copy ModelCheckpoint keeps beside it), else None when there is none.

    Each is read with ``weights_only=True`` (tensors and plain containers: a file planted in a
    shared run folder runs no code).  When every checkpoint present is unreadable, one
    DataFileError names them; a corrupt ``last.ckpt`` beside an intact ``latest.ckpt`` is
    reported and passed over."""
    present = [p for p in (ckpt_dir / "last.ckpt", ckpt_dir / "latest.ckpt") if p.is_file()]
    problems = []
    for path in present:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "state_dict" not in state or "loops" not in state:
                raise ValueError("not a Lightning training checkpoint")
        except Exception as err:  # torch raises many types for truncated / foreign files
            problems.append(f"{path} ({err.__class__.__name__}: {str(err).splitlines()[0]})"
                            if str(err) else f"{path} ({err.__class__.__name__})")
            continue
        if problems:  # recovery says what it did: one line naming the file and the action
            print(f"note: passed over the unreadable checkpoint {problems[0]}; resuming from "
                  f"{path}", file=sys.stderr)
        return path
    if problems:
        raise DataFileError("No readable training checkpoint to resume from: "
                            + "; ".join(problems) + f". Delete {ckpt_dir} to restart this "
                            "stage from scratch.")
    return None


def logged_loss(log_dir: Path) -> float:
    """The last ``train/loss`` the CSV logs of earlier attempts recorded (NaN when none)."""
    last = (-1, float("nan"))
    for path in Path(log_dir).glob("version_*/metrics.csv"):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss") and row.get("step", "").isdigit():
                    last = max(last, (int(row["step"]), float(row["train/loss"])))
    return last[1]


def _check_text(table: TextTable, n_items: int, width: int, text_dir: Path) -> None:
    """The text cache has a row per item and token states the UNet's cross-attention takes."""
    if table.rows.shape[0] != n_items:
        raise DataFileError(f"text cache {text_dir} has {table.rows.shape[0]} items, "
                            f"world has {n_items}")
    if table.embeddings.shape[-1] != width:
        raise ValueError(f"generator.unet.cross_attention_dim={width} but the text encoder "
                         f"gives {table.embeddings.shape[-1]}-d token states")


def _trainer(cfg, out_dir: Path, ckpt_dir: Path, progress: bool) -> L.Trainer:
    """The generator's Lightning trainer: its devices, precision, CSV logs and the one
    checkpoint a killed run resumes from."""
    tcfg = cfg.generator.train
    # Lightning writes last.ckpt only next to a regular checkpoint: keep one (the newest).
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="latest", save_last=True,
                                 save_top_k=1, every_n_epochs=1, auto_insert_metric_name=False,
                                 enable_version_counter=False)
    return L.Trainer(
        max_steps=tcfg.steps, accelerator=accelerator_for(cfg.device), devices=tcfg.devices,
        num_nodes=tcfg.num_nodes, strategy=tcfg.strategy, use_distributed_sampler=False,
        precision=LIGHTNING_PRECISION[tcfg.precision],
        logger=CSVLogger(save_dir=out_dir, name="logs"), callbacks=[checkpoint],
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=10,
        num_sanity_val_steps=0, deterministic=False,
    )


def _steps_done(trainer: L.Trainer, ckpt_dir: Path) -> int:
    """Optimizer steps taken: the trainer's, or with ddp_spawn (whose loops ran in the
    workers) the last checkpoint's."""
    steps = int(trainer.global_step)
    if trainer.world_size > 1 and not steps:
        last = resume_checkpoint(ckpt_dir)
        steps = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    return steps


def train_generator(cfg, world_dir: Path, text_dir: Path, out_dir: Path,
                    progress: bool = True, exclude: list[int] | None = None) -> dict:
    """Train (or resume) the generator; write ``out_dir/unet`` + ``generator.json``.

    ``exclude``: training items left out (leave-K-out counterfactuals): every step draws the
    full run's batch and drops the excluded draws (see ``GeneratorModule``), so only the removed
    items change what is learned.

    Returns:
        {"final_loss": float, "seconds": float, "steps": int, "params": int}
    """
    out_dir = Path(out_dir)
    gcfg, tcfg = cfg.generator, cfg.generator.train
    manifest = read_manifest(world_dir)
    table = TextTable.load(text_dir)
    n_items = manifest["n_items"]
    _check_text(table, n_items, gcfg.unet.cross_attention_dim, text_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    codec = build_codec(gcfg, manifest["image_size"])
    unet = build_unet(gcfg, codec)
    scheduler = build_scheduler(gcfg)
    if exclude and not all(0 <= i < n_items for i in exclude):
        raise ValueError(f"exclude ids must lie in [0, {n_items})")
    if exclude and tcfg.devices * tcfg.num_nodes > 1:
        raise ValueError("leave-K-out retraining runs on one device (generator.train.devices=1"
                         " num_nodes=1): a rank whose slice held only left-out items would "
                         "skip a step the others take")
    latents, _ = world_latents(codec, world_dir, text_dir)
    module = GeneratorModule(unet, table, latents, scheduler.alphas_cumprod,
                             batch_size=tcfg.batch_size, lr=tcfg.lr,
                             weight_decay=tcfg.weight_decay, warmup_steps=tcfg.warmup_steps,
                             cfg_dropout=tcfg.cfg_dropout, ema_decay=tcfg.ema_decay, seed=cfg.seed,
                             lr_schedule=tcfg.lr_schedule, total_steps=tcfg.steps,
                             exclude=sorted(exclude) if exclude else None)
    # The loader only paces steps (an "epoch" = steps_per_epoch steps); each step draws its own
    # items from (seed, global_step), so resuming cannot change what a step sees.
    loader = DataLoader(StepDataset(tcfg.steps_per_epoch), batch_size=1)
    ckpt_dir = out_dir / "checkpoints"
    trainer = _trainer(cfg, out_dir, ckpt_dir, progress)
    resume = resume_checkpoint(ckpt_dir)
    start = time.time()
    trainer.fit(module, loader, ckpt_path=str(resume) if resume else None, weights_only=True)
    seconds = time.time() - start
    if trainer.world_size > 1 and trainer.global_rank != 0:  # a ddp worker (torchrun/SLURM)
        sys.exit(0)  # rank 0 saves the generator and carries on
    final_loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    if final_loss != final_loss and resume:  # resumed at the end: no step logged this time
        final_loss = logged_loss(out_dir / "logs")
    steps = _steps_done(trainer, ckpt_dir)
    meta = {"config": to_dict(gcfg), "world": manifest["sha256"], "text_source": table.source,
            "steps": steps, "ema": tcfg.ema_decay > 0,
            "image_size": manifest["image_size"], "excluded": sorted(exclude or [])}
    save_generator(out_dir, module.sampling_unet(), meta)
    return {"final_loss": final_loss, "seconds": seconds, "steps": steps,
            "params": sum(p.numel() for p in unet.parameters())}
