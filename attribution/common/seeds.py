"""Seeds that are functions of integer keys, so a draw never depends on batch size or order."""

from __future__ import annotations

import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a fixed function of integer keys (no Python hash())."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
