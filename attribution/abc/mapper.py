"""Features tuned for attribution on customization pairs (the ICCV 2023 recipe).

A small mapper g on frozen features — linear initialized to the identity, or a residual MLP whose
last layer starts at zero (so both start as the untuned space) — is trained contrastively: for a
synthesized image q of a training concept, every exemplar of that concept should score higher
than every other pool item (training images and the other concepts' exemplars):

    loss(q) = −log Σ_{e ∈ E(q)} softmax_j( cos(g(q), g(x_j)) / τ )

over the whole pool j (small enough here to score in full every step).  Evaluation is on
held-out concepts the mapper never saw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attribution.common.seeds import seeded_generator


class Mapper(nn.Module):
    """g: (B, D) -> (B, D), the identity at initialization."""

    def __init__(self, dim: int, kind: str = "linear", hidden: int = 256):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"mapper kind must be linear or mlp, got {kind!r}")
        self.kind = kind
        if kind == "linear":
            self.net = nn.Linear(dim, dim)
            with torch.no_grad():
                self.net.weight.copy_(torch.eye(dim))
                self.net.bias.zero_()
        else:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
            with torch.no_grad():
                self.net[-1].weight.zero_()
                self.net[-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x) if self.kind == "linear" else x + self.net(x)
        return F.normalize(y, dim=-1)


def contrastive_loss(q: torch.Tensor, pool: torch.Tensor, positives: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Mean over queries of −log (softmax mass on the query's positives).

    Args:
        q: (B, D) and pool: (P, D), both L2-normalized; positives: bool (B, P).
    """
    logits = q @ pool.T / temperature
    pos = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(pos, 1)).mean()


def train_mapper(queries: torch.Tensor, pool: torch.Tensor, positives: torch.Tensor,
                 kind: str = "linear", steps: int = 300, lr: float = 1e-3,
                 temperature: float = 0.05, batch_size: int = 64, weight_decay: float = 0.0,
                 seed: int = 0) -> tuple[Mapper, dict]:
    """Fit a mapper on (query, pool, positives) of the training concepts.

    Args:
        queries: float (Q, D) features of synthesized images; pool: float (P, D) features of the
        pool the training concepts see; positives: bool (Q, P) exemplar membership.

    Returns:
        (the mapper in eval mode, {"loss_start", "loss_end"} on the whole training set).
    """
    if not positives.any(1).all():
        raise ValueError("every training query needs at least one exemplar in the pool")
    torch.manual_seed(seed)
    mapper = Mapper(queries.shape[1], kind)
    opt = torch.optim.AdamW(mapper.parameters(), lr=lr, weight_decay=weight_decay)

    def full_loss() -> float:
        with torch.no_grad():
            return float(contrastive_loss(mapper(queries), mapper(pool), positives, temperature))

    start = full_loss()
    mapper.train()
    for step in range(steps):
        g = seeded_generator(seed, 37, step)
        idx = torch.randperm(len(queries), generator=g)[:batch_size]
        loss = contrastive_loss(mapper(queries[idx]), mapper(pool), positives[idx], temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite mapper loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mapper.eval()
    return mapper, {"loss_start": start, "loss_end": full_loss()}
