"""The shared MLP head and the pair score.

Sign convention (explicit, and the same from the first step): a HIGHER score means MORE
influential.  s(q, x) = α · cos(f(q), f(x)) + β with α = exp(log_α) > 0, so ranking by s is
ranking by cos(f(q), f(x)) descending: retrieval is a plain maximum-inner-product search over
L2-normalized embeddings.  (The reference trains "low score = influential" with α initialised
to +1 and ranks ascending, which is right only once α has turned negative; SPEC §3.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """MLP f: (B, D_in) -> (B, D_out), shared by queries and training items.

    Args:
        dims: [D_in, h1, ..., D_out]; ReLU + dropout between layers, none after the last.
        layernorm: LayerNorm on the input features (helps when blocks differ in scale).
    """

    def __init__(self, dims: list[int], dropout: float = 0.1, layernorm: bool = False,
                 alpha_init: float = 1.0):
        super().__init__()
        if len(dims) < 2:
            raise ValueError("head dims need at least [D_in, D_out]")
        layers: list[nn.Module] = [nn.LayerNorm(dims[0])] if layernorm else []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)
        if alpha_init <= 0:
            raise ValueError("alpha_init must be positive (higher score = more influential)")
        self.log_alpha = nn.Parameter(torch.tensor(float(alpha_init)).log())
        self.beta = nn.Parameter(torch.zeros(()))
        self.in_dim, self.out_dim = dims[0], dims[-1]

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """L2-normalized embeddings (B, D_out): the vectors that go into the index."""
        if feats.shape[-1] != self.in_dim:
            raise ValueError(f"head expects {self.in_dim}-d features, got {feats.shape[-1]}")
        return F.normalize(self.net(feats), dim=-1)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def score(self, eq: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        """s = α·cos + β for embedded queries (B, D) and items (B, P, D) -> (B, P)."""
        return self.alpha * torch.einsum("bd,bpd->bp", eq, ex) + self.beta
