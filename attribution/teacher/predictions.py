"""The generator's noise predictions along the query's unlearning direction d, and what they
give: J·d by a central difference, and an item's loss change to second order (docs/results.md, "The teacher").

With p(θ) the noise prediction on one (item, view, caption, t) sample, r0 = p(θ0) − ε its
residual and a = J·d its derivative along d, the sample's loss at θ0 + η·d is

    ℓ(η) − ℓ(0) = 2η·mean(r0·a) + η²·[mean(a²) + mean(r0·b)] + O(η³)      (b = d²p/dη²)

The *quadratic model* keeps the first-order term exactly and the curvature by its Gauss–Newton
part mean(a²) (never negative; the residual part r0·b does not converge in float32 here).  a is
taken by a difference at a small step s·η (no float32 cancellation of two losses): central,
p(θ0 ± sη·d), two forward sweeps, p(θ0) as the mean of the two sides (off by ½(sη)²·b); or
forward, p(θ0 + sη·d) against θ0's predictions computed once for every item (one sweep a query;
a is off by ½sη·b, so s is smaller: ``FORWARD_FACTOR``).  Used by the teacher's ``quadratic``
estimator (``teacher.estimator``, ``teacher.difference``) and the step-free ranking
(``studies/curvature.py``, central).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import nn

from attribution.generator.model import add_noise
from attribution.teacher.candidates import CandidateSet, loss_plan, plan_inputs
from attribution.teacher.params import ParamSnapshot
from attribution.teacher.unlearn import apply_step

DIFFERENCE_FACTOR = 1e-3  # s: J·d matches the exact product to ~1e-3 here (1e-2: a few %)
# the forward difference's s: its O(s) truncation against float32 rounding ∝ 1/s balance near
# 3e-4 here (toy_evidence val queries: 0.998 mAP@10 with the central ranking, docs/results.md)
FORWARD_FACTOR = 3e-4

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x_t, t, token states)


class Perturbable(Protocol):
    """A generator whose unlearned parameters can be stepped and restored (the teacher's
    scorer)."""

    unet: nn.Module
    params: dict[str, nn.Parameter]
    snapshot: ParamSnapshot


def iter_samples(cands: CandidateSet, alphas: torch.Tensor, item_ids: torch.Tensor, tc,
                 seed: int, device: str | torch.device = "cpu"
                 ) -> Iterator[tuple[Batch, torch.Tensor]]:
    """The noisy inputs of every (item, view, caption, t) sample the teacher's loss of
    ``item_ids`` averages over, with its own noise, batch by batch (``loss_plan`` order):
    -> (batch, ε (B, C, h, w)) — one batch in memory at a time."""
    keys = loss_plan(item_ids, tc.captions, list(tc.timesteps), tc.flips)
    for s in range(0, len(keys), tc.batch_size):
        z, cond, t, eps = plan_inputs(cands, keys[s : s + tc.batch_size], seed, device)
        yield (add_noise(alphas, z, eps, t), t, cond), eps


def sample_inputs(cands: CandidateSet, alphas: torch.Tensor, item_ids: torch.Tensor, tc,
                  seed: int, device: str | torch.device = "cpu"
                  ) -> tuple[list[Batch], torch.Tensor]:
    """:func:`iter_samples` all at once: -> (batches, ε (S, C, h, w))."""
    pairs = list(iter_samples(cands, alphas, item_ids, tc, seed, device))
    return [b for b, _ in pairs], torch.cat([e for _, e in pairs])


@torch.no_grad()
def predictions(unet: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """float32 (S, C, h, w): the noise predictions on every sample, in plan order (CPU)."""
    return torch.cat([unet(x, t, c).sample.float().cpu() for x, t, c in batches])


def per_item(values: torch.Tensor, n_items: int, views: int) -> torch.Tensor:
    """(S,) per-sample values in ``loss_plan`` order -> (n_items,): mean over captions and
    timesteps, max over views (as the teacher's influence)."""
    return by_view(values, n_items, views).max(1).values


def by_view(values: torch.Tensor, n_items: int, views: int) -> torch.Tensor:
    """(S,) per-sample values in ``loss_plan`` order -> (n_items, views): mean over captions
    and timesteps."""
    return values.view(n_items, views, -1).mean(-1)


def predictions_at(model: Perturbable, d: dict[str, torch.Tensor], batches: list[Batch],
                   step: float) -> torch.Tensor:
    """p(θ0 + step·d) on every sample; θ0 is restored after."""
    apply_step(model.params, d, step)
    try:
        return predictions(model.unet, batches)
    finally:
        model.snapshot.restore()


def predictions_both_ways(model: Perturbable, d: dict[str, torch.Tensor],
                          batches: list[Batch], step: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(p(θ0 + step·d), p(θ0 − step·d)) on every sample; θ0 is restored after each side."""
    return predictions_at(model, d, batches, step), predictions_at(model, d, batches, -step)


def central_jd(model: Perturbable, d: dict[str, torch.Tensor], batches: list[Batch],
               step: float) -> torch.Tensor:
    """(p(θ0 + step·d) − p(θ0 − step·d)) / 2·step: J·d by a central difference, per sample."""
    plus, minus = predictions_both_ways(model, d, batches, step)
    return (plus - minus) / (2 * step)


def quadratic_terms(model: Perturbable, d: dict[str, torch.Tensor],
                    samples: Iterable[tuple[Batch, torch.Tensor]], n_items: int, views: int,
                    step: float, base: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The quadratic model's two terms per (item, view), each (n_items, views): the slope
    mean(r0·a) and the Gauss–Newton curvature mean(a²), a = J·d by a central difference at
    ``step``, or, given ``base`` (θ0's predictions on the same samples, (S, C, h, w) in plan
    order), by a forward one; ``samples`` as :func:`iter_samples` gives them (or a list)."""
    slope, curve, at = [], [], 0
    for batch, eps in samples:
        if base is None:
            plus, minus = predictions_both_ways(model, d, [batch], step)
            a, p0 = (plus - minus) / (2 * step), (plus + minus) / 2
        else:
            plus = predictions_at(model, d, [batch], step)
            p0, at = base[at : at + len(plus)], at + len(plus)
            if p0.shape != plus.shape:
                raise ValueError(f"θ0's predictions hold {len(base)} samples, fewer than the "
                                 "candidates'")
            a = (plus - p0) / step
        r0 = p0 - eps.float()
        slope.append((r0 * a).flatten(1).mean(1))
        curve.append(a.pow(2).flatten(1).mean(1))
    if base is not None and at != len(base):
        raise ValueError(f"θ0's predictions hold {len(base)} samples, the candidates {at}")
    out = (by_view(torch.cat(slope), n_items, views), by_view(torch.cat(curve), n_items, views))
    if not all(torch.isfinite(t).all() for t in out):
        raise FloatingPointError("non-finite predictions along the unlearning direction")
    return out


def quadratic_influence(slope: torch.Tensor, curve: torch.Tensor, eta: float) -> torch.Tensor:
    """(K,): each item's loss change at θ0 + η·d under the quadratic model,
    2η·mean(r0·a) + η²·mean(a²), max over views (as the exact influence)."""
    return (2 * eta * slope + eta**2 * curve).max(1).values
