"""AbU for one query: gradient, one natural-gradient step, candidate losses, restore θ0.
(Several steps from one gradient, and unlearning paths, are studies: ``attribution/studies/``.)"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from attribution.config import ConfigError, TeacherConfig
from attribution.generator.model import denoising_loss
from attribution.teacher.candidates import CandidateSet, candidate_losses, influence_from_losses
from attribution.teacher.noise import query_draws
from attribution.teacher.params import ParamSnapshot
from attribution.teacher.predictions import (
    DIFFERENCE_FACTOR,
    FORWARD_FACTOR,
    iter_samples,
    predictions,
    quadratic_influence,
    quadratic_terms,
)
from attribution.teacher.unlearn import apply_step, query_gradient

BASE_PREDICTIONS_BYTES = 4 * 2**30  # the most teacher.difference: forward holds in memory


@dataclass
class Query:
    """One query to attribute.

    Attributes:
        query_id: its row in the query set (also seeds its (t, ε) draws).
        z: float (C, h, w) generated sample in model space; cond: float (L, D) prompt states.
        candidates: int (K,) training items to score.
    """

    split: str
    query_id: int
    z: torch.Tensor
    cond: torch.Tensor
    candidates: torch.Tensor


@torch.no_grad()
def query_loss(unet: nn.Module, alphas_cumprod: torch.Tensor, z: torch.Tensor,
               cond: torch.Tensor, query_id: int, draws: int, seed: int,
               batch_size: int = 128) -> float:
    """The query's own denoising loss, mean over its fixed (t, ε) draws (those of its unlearning
    gradient), so before/after and across generators see the same noise."""
    t, eps = query_draws(query_id, draws, len(alphas_cumprod), tuple(z.shape), seed)
    total = 0.0
    for s in range(0, len(t), batch_size):
        tt, ee = t[s : s + batch_size], eps[s : s + batch_size]
        b = len(tt)
        total += float(denoising_loss(unet, alphas_cumprod, z.expand(b, *z.shape),
                                      cond.expand(b, *cond.shape), tt.to(z.device),
                                      ee.to(z.device))) * b
    return total / len(t)


class AbUScorer:
    """Scores queries against a fixed generator; keeps θ0 in memory and restores it every query.

    Args:
        params: the unlearned parameters (a subset of ``unet``'s), updated in place then restored.
        precondition: grads -> natural-gradient direction (diagonal or EK-FAC).
        base_losses: float (N, V) L_j(θ0) for every candidate item (computed once, cached).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, cands: CandidateSet,
                 params: dict[str, nn.Parameter], precondition, base_losses: torch.Tensor,
                 tc: TeacherConfig, seed: int, device: str | torch.device = "cpu"):
        self.unet, self.cands = unet.to(device).eval(), cands
        self._alphas = alphas_cumprod
        # the teacher section is read as it is (eta, query_draws, query_batch_size, timesteps,
        # captions, flips, batch_size): no copy with defaults of its own
        self.params, self.precondition, self.tc, self.seed = params, precondition, tc, seed
        self.base = base_losses
        self.snapshot = ParamSnapshot(params)
        self._base_predictions: torch.Tensor | None = None  # (N, samples, C, h, w), when asked

    @property
    def device(self) -> torch.device:
        """Wherever the generator is now (Lightning may have moved it after construction)."""
        return next(self.unet.parameters()).device

    @property
    def alphas(self) -> torch.Tensor:
        return self._alphas.to(self.device)

    def own_loss(self, q: Query) -> float:
        """The query's own loss at the current parameters (its fixed (t, ε) draws)."""
        return query_loss(self.unet, self.alphas, q.z.to(self.device), q.cond.to(self.device),
                          q.query_id, self.tc.query_draws, self.seed, self.tc.query_batch_size)

    def gradient(self, q: Query, where: str = "") -> tuple[dict[str, torch.Tensor], float]:
        """The query's gradient and loss at the current parameters (its own (t, ε) draws)."""
        with torch.enable_grad():
            grads, loss = query_gradient(self.unet, self.params, self.alphas,
                                         q.z.to(self.device), q.cond.to(self.device),
                                         self.tc.query_draws, self.tc.query_batch_size,
                                         self.seed, q.query_id)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            raise FloatingPointError(f"non-finite query gradient for {q.split}/{q.query_id}"
                                     + where)
        return grads, loss

    def direction(self, q: Query, precondition=None) -> tuple[dict[str, torch.Tensor], float]:
        """The query's natural-gradient unlearning direction d = P⁻¹g_q (the step is η·d) and
        its loss at θ0."""
        grads, loss = self.gradient(q)
        return (precondition or self.precondition)(grads), loss

    def influence(self, q: Query, where: str) -> torch.Tensor:
        """Candidate loss changes (K,) at the current parameters against θ0's base losses."""
        after = candidate_losses(self.unet, self.alphas, self.cands, q.candidates,
                                 list(self.tc.timesteps), self.tc.captions, self.tc.flips,
                                 self.seed, self.tc.batch_size, self.device)
        influence = influence_from_losses(after, self.base[q.candidates])
        if not torch.isfinite(influence).all():
            raise FloatingPointError(f"non-finite influence for query {q.split}/{q.query_id}"
                                     f" ({where})")
        return influence

    def score(self, q: Query) -> dict:
        """Returns {"influence": float (K,), "query_loss_before", "query_loss_after", "seconds"}:
        the candidates' loss change after the step as ``teacher.estimator`` takes it."""
        if len(q.candidates) == 0:
            raise ValueError(f"query {q.split}/{q.query_id} has an empty candidate set")
        if self.tc.estimator == "quadratic":
            return self.score_quadratic(q, [self.tc.eta])[0]
        start = time.time()
        d, before = self.direction(q)
        r = self.step_result(q, d, before, self.tc.eta, f"step η={self.tc.eta:g}")
        return {**r, "seconds": time.time() - start}

    def step_result(self, q: Query, d: dict[str, torch.Tensor], before: float, eta: float,
                    where: str) -> dict:
        """Take the step θ0 + η·d, measure the query's own loss and the candidates' loss
        changes there, restore θ0 -> {"influence", "query_loss_before", "query_loss_after"}."""
        apply_step(self.params, d, eta)
        try:
            after_q = self.own_loss(q)
            influence = self.influence(q, where)
        finally:
            self.snapshot.restore()
        return {"influence": influence, "query_loss_before": before,
                "query_loss_after": after_q}

    def score_quadratic(self, q: Query, etas: list[float], direction=None) -> list[dict]:
        """:meth:`score` with the loss change under its second-order model
        (``teacher/predictions.py``): 2η·mean(r0·a) + η²·mean(a²), a = J·d from the predictions
        at θ0 ± 10⁻³·η·d (``teacher.difference: forward``: at θ0 + 3·10⁻⁴·η·d against θ0's),
        so the step is only a weight between the two terms.  The query's own loss after the
        step is measured by taking it (a diagnostic, as in :meth:`score`).  One result per step
        size of ``etas``, all from the same predictions; ``direction``: (d, the query's loss at
        θ0) when already taken (:meth:`direction`), else the scorer's own."""
        start = time.time()
        d, before, slope, curve = self.quadratic_terms(
            q, forward=self.tc.difference == "forward", direction=direction)
        out = []
        for eta in etas:
            apply_step(self.params, d, eta)
            try:
                after_q = self.own_loss(q)
            finally:
                self.snapshot.restore()
            out.append({"influence": quadratic_influence(slope, curve, eta),
                        "query_loss_before": before, "query_loss_after": after_q,
                        "seconds": time.time() - start})
        return out

    def quadratic_terms(self, q: Query, samples=None, factor: float | None = None,
                        forward: bool = False, direction=None
                        ) -> tuple[dict[str, torch.Tensor], float, torch.Tensor, torch.Tensor]:
        """(d, the query's loss at θ0, slope, curve): the quadratic model's two terms per
        (candidate, view) along the query's unlearning direction d, J·d by a central (or
        ``forward``: against :meth:`base_predictions`) difference at ``factor`` × η
        (``predictions.quadratic_terms``; default ``DIFFERENCE_FACTOR``, forward
        ``FORWARD_FACTOR``).  ``samples``: the candidates' sample inputs when already built
        (``iter_samples``), else streamed; ``direction``: (d, loss) when already taken."""
        if len(q.candidates) == 0:
            raise ValueError(f"query {q.split}/{q.query_id} has an empty candidate set")
        base = self.base_predictions(q.candidates) if forward else None
        factor = factor or (FORWARD_FACTOR if forward else DIFFERENCE_FACTOR)
        d, before = direction or self.direction(q)
        if samples is None:
            samples = iter_samples(self.cands, self.alphas, q.candidates, self.tc, self.seed,
                                   self.device)
        # d ∝ 1/gain exactly (the damping is a fraction of the scaled Fisher), so the difference
        # is taken at the step the gain-N teacher takes: J·d is as precise in float32 at the
        # published gain N² (a step N times smaller) as at N, and unchanged at gain N
        n = len(self.cands)
        step = self.tc.eta * factor * (getattr(self.precondition, "gain", n) / n)
        try:
            slope, curve = quadratic_terms(self, d, samples, len(q.candidates),
                                           2 if self.tc.flips else 1, step, base)
        except FloatingPointError:
            raise FloatingPointError(f"non-finite predictions for query {q.split}/"
                                     f"{q.query_id} along its unlearning direction") from None
        return d, before, slope, curve

    def base_predictions(self, items: torch.Tensor) -> torch.Tensor:
        """θ0's noise predictions (S, C, h, w) on every sample of ``items`` in plan order, from
        a table of every item's computed by one sweep the first time (the generator at θ0: no
        step is taken outside a query's scoring, which restores θ0)."""
        if self._base_predictions is None:
            n = len(self.cands)
            per_item = (2 if self.tc.flips else 1) * self.tc.captions * len(self.tc.timesteps)
            size = n * per_item * int(torch.Size(self.cands.shape).numel()) * 4
            if size > BASE_PREDICTIONS_BYTES:
                raise ConfigError(
                    f"teacher.difference: forward would hold θ0's predictions for {n} items x "
                    f"{per_item} samples ({size / 2**30:.1f} GiB, over the "
                    f"{BASE_PREDICTIONS_BYTES / 2**30:.0f} GiB limit); use "
                    "teacher.difference=central (two sweeps a query, nothing held)")
            table = [predictions(self.unet, [batch]) for batch, _ in iter_samples(
                self.cands, self.alphas, torch.arange(n), self.tc, self.seed, self.device)]
            self._base_predictions = torch.cat(table).view(n, per_item, *self.cands.shape)
        return self._base_predictions[items].flatten(0, 1)
