"""The studies' ways of scoring one query: several step sizes from one gradient, other
preconditioners, and unlearning along a path instead of one step.

The teacher a run uses takes one step (``AbUScorer.score``); these functions reuse its parts —
the query gradient, the preconditioner, the candidates' losses after a step, θ0 restored — so
factor 1 here reproduces the run's teacher exactly.
"""

from __future__ import annotations

import time

import torch

from attribution.teacher.scorer import AbUScorer, Query
from attribution.teacher.unlearn import apply_step


def directions(scorer: AbUScorer, q: Query, etas: list[float], preconditioners: list | None
               ) -> tuple[list, dict[int, dict[str, torch.Tensor]], float, float]:
    """Several steps' shared start: ONE query gradient, preconditioned once by each distinct
    preconditioner (one per η; default the scorer's own) -> (preconditioners,
    {id(preconditioner): d}, the query's loss at θ0, seconds taken)."""
    preconditioners = preconditioners or [scorer.precondition] * len(etas)
    if len(preconditioners) != len(etas):
        raise ValueError(f"{len(etas)} step sizes but {len(preconditioners)} preconditioners")
    if len(q.candidates) == 0:
        raise ValueError(f"query {q.split}/{q.query_id} has an empty candidate set")
    start = time.time()
    grads, before = scorer.gradient(q)
    found: dict[int, dict[str, torch.Tensor]] = {}
    for p in preconditioners:
        if id(p) not in found:
            found[id(p)] = p(grads)
    return preconditioners, found, before, time.time() - start


def score_steps(scorer: AbUScorer, q: Query, etas: list[float],
                preconditioners: list | None = None) -> list[dict]:
    """``scorer.score`` by the exact ascent for several step sizes η from ONE query gradient:
    θ0 is restored between steps, so each result equals a separate ``score`` with that η.
    ``preconditioners`` (one per η; default the scorer's own): the same gradient
    preconditioned another way, e.g. with another damping (``with_damping``)."""
    preconditioners, found, before, grad_seconds = directions(scorer, q, etas, preconditioners)
    out = []
    for eta, p in zip(etas, preconditioners):
        t0 = time.time()
        r = scorer.step_result(q, found[id(p)], before, eta, f"step η={eta:g}")
        out.append({**r, "seconds": grad_seconds + time.time() - t0})
    return out


def score_at(scorer: AbUScorer, q: Query, etas: list[float],
             preconditioners: list | None = None) -> list[dict]:
    """``scorer.score`` at several step sizes η (and preconditioners, one per η) by the
    configured estimator: :func:`score_steps`, or the quadratic model (every step of one
    direction from one set of predictions)."""
    if scorer.tc.estimator != "quadratic":
        return score_steps(scorer, q, etas, preconditioners)
    preconditioners, found, before, grad_seconds = directions(scorer, q, etas, preconditioners)
    results: dict[int, dict] = {}
    for key, d in found.items():  # every step of one direction from its terms
        at = [i for i, p in enumerate(preconditioners) if id(p) == key]
        for i, r in zip(at, scorer.score_quadratic(q, [etas[i] for i in at], (d, before))):
            results[i] = {**r, "seconds": grad_seconds + r["seconds"]}
    return [results[i] for i in range(len(etas))]


def path_points(etas: list[float], per_decade: int) -> list[float]:
    """The accumulated steps a path visits: geometric, ``per_decade`` a factor of 10, from
    η_min/10, with every η of ``etas`` on it (points within 10⁻⁶ of one replaced by it)."""
    ratio = 10.0 ** (1.0 / per_decade)
    points, c = [], etas[0] / 10
    while c < etas[-1] * (1 - 1e-9):
        points.append(c)
        c *= ratio
    near = [c for c in points if any(abs(c - e) <= 1e-6 * e for e in etas)]
    return sorted((set(points) - set(near)) | set(etas))


def score_path(scorer: AbUScorer, q: Query, etas: list[float], per_decade: int,
               precondition=None) -> list[dict]:
    """Unlearning along a PATH instead of one step (the step study's ``--path``): the
    natural-gradient ascent is taken in small steps, the query gradient recomputed at each
    point with the same (t, ε) draws (the preconditioner stays the Fisher at θ0), and the
    candidates are scored where the accumulated step reaches each η of ``etas``
    (:func:`path_points`); ``path_steps`` counts the gradients each result took.  One step per
    decade or fewer approaches ``scorer.score`` only at the first η; as ``per_decade`` grows
    the path tends to the natural-gradient flow."""
    if per_decade < 1:
        raise ValueError(f"a path needs at least 1 step per decade, got {per_decade}")
    etas = sorted(float(e) for e in etas)
    if not etas or etas[0] <= 0:
        raise ValueError(f"path step sizes must be positive, got {etas}")
    if len(q.candidates) == 0:
        raise ValueError(f"query {q.split}/{q.query_id} has an empty candidate set")
    precondition = precondition or scorer.precondition
    start, out, done, before = time.time(), [], 0.0, None
    try:
        for i, c in enumerate(path_points(etas, per_decade)):
            grads, loss = scorer.gradient(q, f" on the unlearning path (η={c:g})")
            before = loss if before is None else before
            apply_step(scorer.params, precondition(grads), c - done)
            done = c
            if c in etas:
                influence = scorer.influence(q, f"path η={c:g}")
                out.append({"influence": influence, "query_loss_before": before,
                            "query_loss_after": scorer.own_loss(q), "path_steps": i + 1,
                            "seconds": time.time() - start})
    finally:
        scorer.snapshot.restore()
    return out
