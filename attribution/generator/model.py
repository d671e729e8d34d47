"""The generator's plain parts (no Lightning): codec, UNet, noise schedule, denoising loss.

The diffusion model lives in *model space*: pixels in [-1, 1] for ``codec=pixel`` (the toy
world), or VAE latents times ``latent_scale`` for ``codec=vae`` (MSCOCO, Stable Diffusion).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from attribution.config import to_dict


class PixelCodec(nn.Module):
    """Identity codec: model space = pixels in [-1, 1]."""

    def __init__(self, image_size: int, channels: int = 3):
        super().__init__()
        self.channels, self.size = channels, image_size

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)


class VAECodec(nn.Module):
    """AutoencoderKL codec: z = scale * (a sample of the posterior), as in Stable Diffusion."""

    def __init__(self, vae_path: str, scale: float, image_size: int):
        super().__init__()
        from diffusers import AutoencoderKL

        if not Path(vae_path).is_dir():
            raise FileNotFoundError(f"VAE folder not found: {vae_path}")
        self.vae = AutoencoderKL.from_pretrained(vae_path).eval().requires_grad_(False)
        self.scale = scale
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.channels, self.size = self.vae.config.latent_channels, image_size // down

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.sample(generator) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scale).sample.clamp(-1, 1)


def build_codec(gen_cfg, image_size: int) -> nn.Module:
    if gen_cfg.codec == "vae":
        return VAECodec(gen_cfg.vae_path, gen_cfg.latent_scale, image_size)
    return PixelCodec(image_size)


def unet_kwargs(gen_cfg, codec: nn.Module) -> dict:
    u = to_dict(gen_cfg.unet)
    if len({len(u["block_out_channels"]), len(u["down_block_types"]), len(u["up_block_types"])}) != 1:
        raise ValueError("generator.unet: block_out_channels, down_block_types and up_block_types "
                         "must have the same length")
    return dict(
        sample_size=codec.size,
        in_channels=codec.channels,
        out_channels=codec.channels,
        block_out_channels=tuple(u["block_out_channels"]),
        down_block_types=tuple(u["down_block_types"]),
        up_block_types=tuple(u["up_block_types"]),
        layers_per_block=u["layers_per_block"],
        attention_head_dim=u["attention_head_dim"],
        norm_num_groups=u["norm_num_groups"],
        cross_attention_dim=u["cross_attention_dim"],
    )


def build_unet(gen_cfg, codec: nn.Module) -> UNet2DConditionModel:
    return UNet2DConditionModel(**unet_kwargs(gen_cfg, codec))


def build_scheduler(gen_cfg) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=gen_cfg.num_train_timesteps,
        beta_start=gen_cfg.beta_start,
        beta_end=gen_cfg.beta_end,
        beta_schedule=gen_cfg.beta_schedule,
        clip_sample=False,
    )


def add_noise(alphas_cumprod: torch.Tensor, z: torch.Tensor, noise: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, with t an int tensor (B,)."""
    abar = alphas_cumprod.to(z.device)[t].view(-1, *([1] * (z.dim() - 1)))
    return abar.sqrt() * z + (1 - abar).sqrt() * noise


def denoising_loss(unet: nn.Module, alphas_cumprod: torch.Tensor, z: torch.Tensor,
                   cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   reduce: bool = True) -> torch.Tensor:
    """ℓ(θ; z, c, t, ε) = mean ‖ε_θ(x_t, t, c) − ε‖² (docs/method.md §2).

    Args:
        z: (B, C, h, w) model-space inputs; cond: (B, L, D) token states; t: (B,) ints;
        noise: (B, C, h, w) ε.
        reduce: mean over the batch too (scalar); else per-item losses (B,).
    """
    pred = unet(add_noise(alphas_cumprod, z, noise, t), t, cond).sample
    per_item = (pred.float() - noise.float()).pow(2).flatten(1).mean(1)
    return per_item.mean() if reduce else per_item


def save_generator(path: Path, unet: UNet2DConditionModel, meta: dict) -> None:
    """Write the UNet weights (safetensors, via diffusers) and a manifest tying it to its config."""
    from attribution.common.files import atomic_write_bytes, sha256_file

    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    manifest = dict(meta, weights_sha256=sha256_file(weights))
    atomic_write_bytes(path / "generator.json", json.dumps(manifest, indent=2).encode())


def load_unet(path: Path) -> tuple[UNet2DConditionModel, dict]:
    """Load a UNet saved by :func:`save_generator`; checks the weights against the manifest."""
    from attribution.common.files import DataFileError, sha256_file

    path = Path(path)
    manifest_path = path / "generator.json"
    if not manifest_path.is_file():
        raise DataFileError(f"Generator manifest missing: {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise DataFileError(f"Generator weights missing: {weights}")
    if sha256_file(weights) != manifest["weights_sha256"]:
        raise DataFileError(f"Generator weights are corrupt (sha256 differs from manifest): {weights}")
    return UNet2DConditionModel.from_pretrained(path / "unet").eval(), manifest


def load_unet_weights(gen_cfg, codec: nn.Module, path: str | Path) -> UNet2DConditionModel:
    """The configured UNet with weights from a file (the released ``model.bin``: a state dict,
    optionally under ``state_dict`` / ``module.``-prefixed, or a safetensors file).

    A file that does not fit the configured architecture fails naming the keys that differ."""
    from attribution.common.files import DataFileError

    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"Generator weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataFileError(f"Generator weights unreadable: {path} ({err})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("unet."): v for k, v in state.items()}
    unet = build_unet(gen_cfg, codec)
    own = unet.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise DataFileError(
            f"{path} does not fit generator.unet: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} with other shapes "
            f"{sorted(shapes)[:3]} (check block_out_channels, layers_per_block, "
            f"cross_attention_dim)")
    unet.load_state_dict(state)
    return unet.eval()


# the same names in our generator config and in a diffusers scheduler_config.json
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


def load_pretrained_unet(gen_cfg, codec: nn.Module, path: str | Path) -> UNet2DConditionModel:
    """The UNet of a diffusers pipeline folder (``unet/``) or of a UNet folder, with its own
    architecture.  Checked against this run: latent channels of the codec, and the pipeline's
    scheduler config (``scheduler/``) against generator.num_train_timesteps / beta_*."""
    from attribution.common.files import DataFileError

    root = Path(path).expanduser()
    folder = root / "unet" if (root / "unet").is_dir() else root
    if not (folder / "config.json").is_file():
        raise DataFileError(f"no diffusers UNet (config.json) in {folder}")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder)
    except Exception as err:
        raise DataFileError(f"could not load the UNet in {folder}: {err}") from err
    if unet.config.in_channels != codec.channels:
        raise DataFileError(f"{folder}: UNet takes {unet.config.in_channels} channels, the codec "
                            f"gives {codec.channels} (generator.codec / vae_path)")
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        theirs = json.loads(sched.read_text())
        bad = {k: (getattr(gen_cfg, k), theirs[k]) for k in SCHEDULE_KEYS
               if k in theirs and getattr(gen_cfg, k) != theirs[k]}
        if bad:
            raise DataFileError(f"{sched} disagrees with the generator's schedule: "
                                + ", ".join(f"generator.{k}={a!r} vs {b!r}"
                                            for k, (a, b) in bad.items()))
    return unet.eval()
