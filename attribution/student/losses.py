"""Learning-to-rank losses: one base class and a name -> class registry (an ablation is a config
value).  Every loss takes pair scores ``s`` float (B, P) — B queries, P candidates each — and
soft targets ``y`` float (B, P) in [0, 1] where HIGHER = MORE influential (y = 1 − π/K for the
candidate at teacher rank π; an outside-set item gets 1/K), and returns a dict of named parts
whose ``loss`` entry is optimized (the others are logged).

- ``ce``: binary cross-entropy between σ(s) and y (the reference's choice).
- ``mse``: (s − y)², regressing the target from the score (the paper: "does not converge well").
- ``ordinal``: rank bins with cumulative logits (proportional-odds ordinal regression).  The
  target bin is b = min(⌊y·n_bins⌋, n_bins−1); with increasing learned thresholds θ_1 < … <
  θ_{n_bins−1}, P(bin > j) = σ(s − θ_j) and the loss is the mean BCE of those n_bins−1 binary
  events.  At test time items are ranked by s: the expected bin Σ_j σ(s − θ_j) is increasing in
  s, so in THIS formulation the ordinal student still supports a plain inner-product search (the
  paper's ordinal head, with per-bin outputs, does not).
- ``listwise`` (beyond the paper): per query, cross-entropy between softmax(y/τ_y) and
  softmax(s) over its candidates — the whole ranking of a query at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES: dict[str, type[RankingLoss]] = {}


def register(name: str):
    def deco(cls):
        LOSSES[name] = cls
        cls.name = name
        return cls

    return deco


class RankingLoss(nn.Module):
    name = ""
    # True when adding a constant to every score of a query leaves the loss unchanged: the score
    # offset β then gets only rounding noise as gradient (which Adam would turn into full-size
    # steps), so it is not trained
    shift_invariant = False

    def forward(self, s: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@register("ce")
class CrossEntropyLoss(RankingLoss):
    def forward(self, s, y):
        return {"loss": F.binary_cross_entropy_with_logits(s, y)}


@register("mse")
class MSELoss(RankingLoss):
    def forward(self, s, y):
        return {"loss": F.mse_loss(s, y)}


@register("ordinal")
class OrdinalLoss(RankingLoss):
    def __init__(self, n_bins: int = 10):
        super().__init__()
        if n_bins < 2:
            raise ValueError("ordinal loss needs at least 2 bins")
        self.n_bins = n_bins
        self.first = nn.Parameter(torch.tensor(-2.0))
        self.gaps = nn.Parameter(torch.full((n_bins - 2,), -0.5))  # softplus(-0.5) ≈ 0.47

    def thresholds(self) -> torch.Tensor:
        """Increasing thresholds θ (n_bins − 1,)."""
        return torch.cat([self.first.view(1), self.first + torch.cumsum(F.softplus(self.gaps), 0)])

    def forward(self, s, y):
        b = (y * self.n_bins).floor().clamp(max=self.n_bins - 1)
        th = self.thresholds()
        logits = s.unsqueeze(-1) - th
        target = (b.unsqueeze(-1) > torch.arange(len(th), device=s.device)).float()
        loss = F.binary_cross_entropy_with_logits(logits, target)
        return {"loss": loss, "threshold_spread": (th[-1] - th[0]).detach()}


@register("listwise")
class ListwiseLoss(RankingLoss):
    shift_invariant = True  # a softmax over each query's candidates

    def __init__(self, target_temperature: float = 0.1):
        super().__init__()
        self.tau = target_temperature

    def forward(self, s, y):
        p = F.softmax(y / self.tau, dim=-1)
        loss = -(p * F.log_softmax(s, dim=-1)).sum(-1).mean()
        return {"loss": loss}


def build_loss(name: str, **kwargs) -> RankingLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    cls = LOSSES[name]
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
