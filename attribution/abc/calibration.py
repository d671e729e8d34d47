"""Soft attribution: turn a method's scores over the pool into a share of influence per item.

    w_i = exp((s_i − max_j s_j) / τ) + exp(b),        p_i = w_i / Σ_j w_j

The softmax is taken relative to the best score, so the best item has weight 1 and exp(b) is an
offset *relative to it*: b → −∞ is a plain softmax with temperature τ, a large b spreads mass
evenly (a confident-looking score gap that often points at the wrong item should not become a
confident share).  τ and b are fit by maximizing the likelihood of the true exemplars on
training customizations, −mean over (query, exemplar) of log p_exemplar, and judged on held-out
ones by that likelihood, by the probability mass on the exemplars, and by the expected
calibration error of the shares the top items get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attribution.common.files import read_json


@dataclass
class Calibrator:
    tau: float = 1.0
    offset: float = -math.inf  # b; -inf = no offset (a plain softmax relative to the best)

    def probabilities(self, scores: np.ndarray | torch.Tensor) -> np.ndarray:
        """Shares (Q, P) that sum to one per query, from scores (Q, P) (or (P,))."""
        s = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
        single = s.dim() == 1
        s = s.view(1, -1) if single else s
        p = _probabilities(s, torch.tensor(math.log(self.tau), dtype=torch.float64),
                           torch.tensor(self.offset, dtype=torch.float64)).numpy()
        return p[0] if single else p

    def to_dict(self) -> dict:
        return {"tau": self.tau, "offset": self.offset}


def _probabilities(s: torch.Tensor, log_tau: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    z = (s - s.max(1, keepdim=True).values) / log_tau.exp()
    # log w_i = logaddexp(z_i, b); normalize in log space for stability
    logw = torch.logaddexp(z, offset.expand_as(z)) if torch.isfinite(offset) else z
    return (logw - torch.logsumexp(logw, 1, keepdim=True)).exp()


def _nll(s: torch.Tensor, positives: torch.Tensor, log_tau: torch.Tensor,
         offset: torch.Tensor) -> torch.Tensor:
    p = _probabilities(s, log_tau, offset)
    logp = p.clamp_min(1e-300).log()
    return -(logp * positives).sum() / positives.sum()


def negative_log_likelihood(cal: Calibrator, scores: np.ndarray, positives: np.ndarray) -> float:
    """−mean log p over every (query, true exemplar) pair."""
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    pos = torch.as_tensor(np.asarray(positives), dtype=torch.float64)
    return float(_nll(s, pos, torch.tensor(math.log(cal.tau), dtype=torch.float64),
                      torch.tensor(cal.offset, dtype=torch.float64)))


def fit_calibrator(scores: np.ndarray, positives: np.ndarray, steps: int = 300,
                   offset: bool = True) -> Calibrator:
    """Maximum-likelihood τ (and b) on scores (Q, P) with positives bool (Q, P).

    τ starts at the spread of the scores' top gaps; L-BFGS on (log τ, b).
    """
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    pos = torch.as_tensor(np.asarray(positives), dtype=torch.float64)
    if not (pos.sum(1) > 0).all():
        raise ValueError("every query needs at least one true exemplar")
    spread = float((s.max(1).values - s.median(1).values).mean().clamp_min(1e-6))
    log_tau = torch.tensor(math.log(spread / 4), dtype=torch.float64, requires_grad=True)
    # b starts where the offset weights of all P items together equal the best item's weight
    b = torch.tensor(-math.log(s.shape[1]), dtype=torch.float64, requires_grad=offset)
    params = [log_tau, b] if offset else [log_tau]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(s, pos, log_tau, b if offset else torch.tensor(-math.inf,
                                                                  dtype=torch.float64))
        loss.backward()
        return loss

    opt.step(closure)
    if not torch.isfinite(log_tau):
        raise FloatingPointError("calibration diverged")
    return Calibrator(float(log_tau.detach().exp()), float(b.detach()) if offset else -math.inf)


def calibration_report(cal: Calibrator, scores: np.ndarray, positives: np.ndarray,
                       top: int = 10, bins: int = 10) -> dict:
    """How well the shares match reality on (scores, positives).

    Returns:
        nll: −mean log p of true exemplars; exemplar_mass: mean Σ_{true} p (ideal 1);
        ece@top: expected calibration error of the top ``top`` items' shares (per-item share
        vs whether it is a true exemplar, ``bins`` equal-width bins).
    """
    p = cal.probabilities(scores)
    pos = np.asarray(positives, dtype=bool)
    order = np.argsort(-p, axis=1, kind="stable")[:, :top]
    conf = np.take_along_axis(p, order, 1).ravel()
    hit = np.take_along_axis(pos, order, 1).ravel().astype(np.float64)
    edges = np.minimum((conf * bins).astype(int), bins - 1)
    ece = sum(abs(conf[edges == b].mean() - hit[edges == b].mean()) * (edges == b).sum()
              for b in range(bins) if (edges == b).any()) / len(conf)
    return {"nll": negative_log_likelihood(cal, scores, pos),
            "exemplar_mass": float((p * pos).sum(1).mean()), f"ece@{top}": float(ece)}


def load_calibrator(abc_dir: Path, method: str = "student") -> Calibrator | None:
    """The soft-attribution calibrator a finished (verified) ``abc`` stage fit for ``method``;
    None when it fit none for that method."""
    cal = read_json(Path(abc_dir) / "calibration.json", "Calibration").get(method)
    return None if cal is None else Calibrator(cal["tau"], cal["offset"])
