"""Customize a trained generator on a few exemplars (Custom Diffusion's recipe, any diffusers UNet).

Only the cross-attention key/value projections are fine-tuned (``teacher/params.py`` group
``cross_attn_kv``), on the exemplars' captions, where a made-up word stands for the concept
(the text encoder stays frozen; see ``concepts.py``).  Prior preservation mixes a batch of the
original training items into every step.  The result is a small *delta* (fine-tuned minus
original K/V) that is saved on its own; applying it and restoring θ0 are exact.

Every random draw of a step comes from (seed, concept index, step): a customization is a pure
function of its inputs, whatever ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from attribution.common.seeds import seeded_generator
from attribution.config import AbcConfig
from attribution.generator.model import denoising_loss
from attribution.teacher.params import ParamSnapshot, select_parameters


@dataclass
class Prior:
    """What prior preservation draws from: the training items and their captions' states.

    Attributes:
        latents: float (N, C, h, w); rows: int (N, n_caps); lookup: rows -> (.., L, D) states.
    """

    latents: torch.Tensor
    rows: torch.Tensor
    lookup: object


def customize(unet: nn.Module, alphas_cumprod: torch.Tensor, z: torch.Tensor,
              cond: torch.Tensor, settings: AbcConfig, key: int,
              prior: Prior | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fine-tune the K/V of ``unet`` on exemplars; return the delta and leave ``unet`` as it was.

    Args:
        z: float (E, C, h, w) the exemplars in model space.
        cond: float (E, n_caps, L, D) token states of each exemplar's captions.
        key: the concept's index (seeds its draws).

    Returns:
        {parameter name: float32 delta} for the fine-tuned parameters.
    """
    if z.shape[0] != cond.shape[0] or z.shape[0] == 0:
        raise ValueError(f"{z.shape[0]} exemplars but {cond.shape[0]} caption sets")
    s = settings
    params = select_parameters(unet, s.params)
    snapshot = ParamSnapshot(params)
    was_training = unet.training
    unet.train()
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=s.lr, weight_decay=0.0)
    device = z.device
    try:
        for step in range(s.steps):
            g = seeded_generator(seed, 31, key, step)
            i = torch.randint(len(z), (s.batch_size,), generator=g)
            c = torch.randint(cond.shape[1], (s.batch_size,), generator=g)
            t = torch.randint(len(alphas_cumprod), (s.batch_size,), generator=g)
            eps = torch.randn((s.batch_size, *z.shape[1:]), generator=g)
            loss = denoising_loss(unet, alphas_cumprod, z[i], cond[i, c].to(device),
                                  t.to(device), eps.to(device))
            if prior is not None and s.prior_weight > 0:
                j = torch.randint(len(prior.latents), (s.prior_batch_size,), generator=g)
                pc = torch.randint(prior.rows.shape[1], (s.prior_batch_size,), generator=g)
                pt = torch.randint(len(alphas_cumprod), (s.prior_batch_size,), generator=g)
                pe = torch.randn((s.prior_batch_size, *z.shape[1:]), generator=g)
                pcond = prior.lookup(prior.rows[j, pc]).to(device)
                loss = loss + s.prior_weight * denoising_loss(
                    unet, alphas_cumprod, prior.latents[j].to(device), pcond, pt.to(device),
                    pe.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite customization loss at step {step} "
                                         f"(concept {key})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        delta = {n: (p.detach() - snapshot.saved[n]).float().cpu() for n, p in params.items()}
    finally:
        snapshot.restore()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        unet.train(was_training)
    return delta


class Customized:
    """Context manager: ``with Customized(unet, delta): ...`` runs with θ0 + delta, then θ0."""

    def __init__(self, unet: nn.Module, delta: dict[str, torch.Tensor]):
        params = dict(unet.named_parameters())
        missing = [n for n in delta if n not in params]
        if missing:
            raise KeyError(f"the delta names parameters this UNet lacks: {missing[:3]}")
        bad = [n for n, d in delta.items() if d.shape != params[n].shape]
        if bad:
            raise ValueError(f"delta shapes differ from the UNet's for {bad[:3]}")
        self.params = {n: params[n] for n in delta}
        self.delta = delta
        self.snapshot: ParamSnapshot | None = None

    def __enter__(self):
        self.snapshot = ParamSnapshot(self.params)
        with torch.no_grad():
            for n, p in self.params.items():
                p.add_(self.delta[n].to(p.device, p.dtype))
        return self

    def __exit__(self, *exc):
        self.snapshot.restore()
        return False


def save_delta(path: Path, delta: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """A customized model on disk: the K/V delta as float16 safetensors (a few hundred KB)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({n: d.to(torch.float16).contiguous() for n, d in delta.items()}, str(tmp),
              metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from attribution.common.files import DataFileError

    try:
        return {n: d.float() for n, d in load_file(str(path)).items()}
    except Exception as err:
        raise DataFileError(f"customized-model delta unreadable: {path} ({err})") from err
