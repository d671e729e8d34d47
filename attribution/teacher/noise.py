"""Noise that is a function of (item id, flip, caption index, t) only.

So before/after losses see the same ε, and no result depends on batch size, order or device.
"""

from __future__ import annotations

import torch

from attribution.common.seeds import seeded_generator


def item_noise(keys: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ε for each row (item, flip, caption, t) of ``keys`` (int (B, 4)); float (B, *shape)."""
    return torch.stack([
        torch.randn(shape, generator=seeded_generator(seed, 23, *row)) for row in keys.tolist()
    ])


def query_draws(query_id: int, n: int, num_timesteps: int, shape: tuple[int, ...],
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, ε) draws of a query's unlearning gradient: ((n,), (n, *shape))."""
    g = seeded_generator(seed, 29, query_id)
    t = torch.randint(num_timesteps, (n,), generator=g)
    return t, torch.randn((n, *shape), generator=g)
