"""Candidate losses L_j(θ): mean over captions and fixed timesteps of the denoising loss, with
noise from (item, flip, caption, t) only (docs/method.md §2.3), so they never depend on batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attribution.data.text_cache import TextTable
from attribution.generator.model import denoising_loss
from attribution.teacher.noise import item_noise


@dataclass
class CandidateSet:
    """The training items a teacher can score.

    Attributes:
        latents: float (N, C, h, w) model-space items (the flipped view is their mirror), or
            (N, 2, C, h, w) with the flipped view stored (a pre-encoded world: the VAE latent of
            the mirrored image, which is not the mirrored latent).
        rows: int (N, n_caps) rows of each item's captions in ``table``.
        table: caption token states.
    """

    latents: torch.Tensor
    rows: torch.Tensor
    table: TextTable

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, h, w) of one item."""
        return tuple(self.latents.shape[-3:])

    def view(self, items: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """float (B, C, h, w): each item's original (flip 0) or mirrored (flip 1) view."""
        items = torch.as_tensor(items, dtype=torch.long)
        flip = torch.zeros_like(items) if flip is None else torch.as_tensor(flip).long()
        if self.latents.dim() == 5:
            return self.latents[items, flip].float()
        z = self.latents[items]
        return torch.where(flip.view(-1, 1, 1, 1).bool(), z.flip(-1), z).float()

    def chunks(self, size: int = 4096):
        """(item ids, original views, first-caption token states) over every item, in chunks
        (a pre-encoded world's token states do not fit in memory at once)."""
        for s in range(0, len(self), size):
            ids = torch.arange(s, min(s + size, len(self)))
            yield ids, self.view(ids), self.table.lookup(self.rows[ids, 0])


def plan_inputs(cands: CandidateSet, keys: torch.Tensor, seed: int,
                device: str | torch.device = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model inputs of plan rows ``keys`` (int (B, 4): item, flip, caption, t), on
    ``device``: (views (B, C, h, w), token states (B, L, D), t (B,), ε (B, C, h, w)).  Each
    distinct caption's token states are read once per batch and repeated on the device (a
    batch holds every view and timestep of its items: at MSCOCO's 2 views x 20 timesteps that
    is 40x less read from the memory-mapped table), and ε is drawn on the device."""
    z = cands.view(keys[:, 0], keys[:, 1]).to(device)
    rows = cands.rows[keys[:, 0], keys[:, 2]]
    distinct, where = torch.unique(rows, return_inverse=True)
    cond = cands.table.lookup(distinct).to(device)[where.to(device)]
    return z, cond, keys[:, 3].to(device), item_noise(keys, cands.shape, seed, device)


def loss_plan(item_ids: torch.Tensor, captions: int, timesteps: list[int],
              flips: bool) -> torch.Tensor:
    """Every (item, flip, caption, t) the loss of ``item_ids`` averages over: int (K*V*C*T, 4)."""
    views = [0, 1] if flips else [0]
    grid = torch.cartesian_prod(item_ids.long(), torch.tensor(views), torch.arange(captions),
                                torch.tensor(timesteps, dtype=torch.long))
    return grid.view(-1, 4)


@torch.no_grad()
def candidate_losses(unet: nn.Module, alphas_cumprod: torch.Tensor, cands: CandidateSet,
                     item_ids: torch.Tensor, timesteps: list[int], captions: int, flips: bool,
                     seed: int, batch_size: int = 512,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """L_j per item and view.

    Args:
        item_ids: int (K,) indices into ``cands``.
        captions: use each item's first ``captions`` captions.

    Returns:
        float32 (K, V) with V = 2 if flips (original, mirrored) else 1.
    """
    if len(item_ids) == 0:
        raise ValueError("empty candidate set: nothing to score")
    if captions > cands.rows.shape[1]:
        raise ValueError(f"teacher uses {captions} captions but items have {cands.rows.shape[1]}")
    keys = loss_plan(item_ids, captions, timesteps, flips)
    out = torch.empty(len(keys))
    for s in range(0, len(keys), batch_size):
        k = keys[s : s + batch_size]
        z, cond, t, eps = plan_inputs(cands, k, seed, device)
        out[s : s + len(k)] = denoising_loss(unet, alphas_cumprod, z, cond, t, eps,
                                             reduce=False).cpu()
    views = 2 if flips else 1
    losses = out.view(len(item_ids), views, captions * len(timesteps)).mean(-1)
    if not torch.isfinite(losses).all():
        bad = item_ids[~torch.isfinite(losses).all(1)].tolist()[:10]
        raise FloatingPointError(f"non-finite candidate losses for items {bad}")
    return losses


def influence_from_losses(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """influence_j = max over views of (L_j(θ_unlearned) − L_j(θ0)); (K, V) -> (K,)."""
    return (after - before).max(dim=1).values
