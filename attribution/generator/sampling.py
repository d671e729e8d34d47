"""Classifier-free-guided sampling with DDPM or DDIM, deterministic per sample.

Each sample i draws its initial noise and its DDPM step noise from its own generator seeded by
(seed, i), so a sample does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from attribution.common.seeds import seeded_generator


def make_sampler(train_scheduler: DDPMScheduler, kind: str, steps: int):
    if kind == "ddim":
        sched = DDIMScheduler.from_config(train_scheduler.config)
    elif kind == "ddpm":
        sched = DDPMScheduler.from_config(train_scheduler.config)
    else:
        raise ValueError(f"unknown sampler {kind!r} (ddpm | ddim)")
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample(
    unet,
    train_scheduler: DDPMScheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    sample_ids: list[int],
    shape: tuple[int, int, int],
    seed: int = 0,
    sampler: str = "ddpm",
    steps: int = 100,
    guidance: float = 3.0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Sample model-space outputs for prompts given as token states.

    Args:
        cond: float (B, L, D) token states of the prompts.
        uncond: float (L, D) token states of the empty prompt.
        sample_ids: B integers; sample i's randomness is a function of (seed, sample_ids[i]).
        shape: (C, h, w) of one sample in model space.
        guidance: CFG scale w: ε = ε_u + w (ε_c − ε_u).  1 disables guidance.

    Returns:
        float (B, C, h, w) on the CPU.
    """
    if cond.shape[0] != len(sample_ids):
        raise ValueError(f"{cond.shape[0]} prompts but {len(sample_ids)} sample ids")
    unet = unet.to(device).eval()
    outs = []
    n_batches = (len(sample_ids) + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * steps, desc="sampling", disable=not progress, leave=False)
    for start in range(0, len(sample_ids), batch_size):
        ids = sample_ids[start : start + batch_size]
        gens = [seeded_generator(seed, 11, i) for i in ids]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        c = cond[start : start + batch_size].to(device)
        u = uncond.to(device).expand_as(c)
        sched = make_sampler(train_scheduler, sampler, steps)
        for t in sched.timesteps:
            tt = torch.full((2 * len(ids),), int(t), device=device, dtype=torch.long)
            eps = unet(torch.cat([x, x]), tt, torch.cat([c, u])).sample
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            kwargs = {"generator": gens} if sampler == "ddpm" else {}
            x = sched.step(eps, t, x, **kwargs).prev_sample
            bar.update(1)
        outs.append(x.float().cpu())
    bar.close()
    return torch.cat(outs)
