"""One natural-gradient *ascent* step on a query's denoising loss (docs/method.md §2.2).

    diagonal: θ = θ0 + η · g_q / (s·F + λ),                 λ = damping · mean(s·F) per tensor
    EK-FAC:   G' = Q_Gᵀ G_q Q_A;  G' ← G' ⊘ (s·Λ + λ);  θ = θ0 + η · Q_G G' Q_Aᵀ
              Λ = lambda_matrix / num_lambda_processed,  λ = damping · mean(s·Λ) per module

s is the Fisher *gain* (default N = number of training items): η, s and the damping are one knob
in practice, so the teacher reports the query's own loss increase, which is what they control.
"""

from __future__ import annotations

import torch
from torch import nn

from attribution.generator.model import denoising_loss
from attribution.teacher.noise import query_draws


def query_gradient(unet: nn.Module, params: dict[str, nn.Parameter], alphas_cumprod: torch.Tensor,
                   z: torch.Tensor, cond: torch.Tensor, n_draws: int, batch_size: int, seed: int,
                   query_id: int) -> tuple[dict[str, torch.Tensor], float]:
    """g_q = ∇θ mean over n_draws (t, ε) of ℓ(θ0; z, c, t, ε); returns (grads, mean loss).

    Args:
        z: (C, h, w) the query in model space; cond: (L, D) its prompt's token states.
    """
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    t_all, eps_all = query_draws(query_id, n_draws, len(alphas_cumprod), tuple(z.shape), seed)
    dev = z.device
    total = 0.0
    for s in range(0, n_draws, batch_size):
        t, eps = t_all[s : s + batch_size].to(dev), eps_all[s : s + batch_size].to(dev)
        b = len(t)
        loss = denoising_loss(unet, alphas_cumprod, z.expand(b, *z.shape),
                              cond.expand(b, *cond.shape), t, eps)
        (loss * b / n_draws).backward()
        total += float(loss.detach()) * b / n_draws
    grads = {}
    for n, p in params.items():
        grads[n] = p.grad.detach().clone()
        p.grad = None
        p.requires_grad_(False)
    return grads, total


class DiagonalPreconditioner:
    """g -> g / (s·F + λ) with F the diagonal Fisher."""

    def __init__(self, fisher: dict[str, torch.Tensor], gain: float, damping: float):
        self.fisher, self.gain, self.damping = fisher, gain, damping
        self.scaled = {n: gain * f for n, f in fisher.items()}
        self.lam = {n: damping * f.mean() for n, f in self.scaled.items()}

    def with_damping(self, damping: float) -> DiagonalPreconditioner:
        """The same Fisher and gain with another damping (the step study's damping axis)."""
        return DiagonalPreconditioner(self.fisher, self.gain, damping)

    def __call__(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(grads) - set(self.scaled)
        if missing:
            raise KeyError(f"Fisher has no entry for {sorted(missing)[:3]}")
        return {n: g / (self.scaled[n].to(g.device) + self.lam[n]) for n, g in grads.items()}


class EKFACPreconditioner:
    """g -> Q_G [(Q_Gᵀ G Q_A) ⊘ (s·Λ + λ)] Q_Aᵀ per Linear module (bias as an extra column)."""

    def __init__(self, factors: dict[str, torch.Tensor], gain: float, damping: float):
        self.factors, self.gain, self.damping = factors, gain, damping
        self.modules = {}
        for key in factors:
            if key.endswith(".lambda_matrix"):
                m = key[: -len(".lambda_matrix")]
                lam = factors[key] / factors[f"{m}.num_lambda_processed"].clamp_min(1)
                scaled = gain * lam
                self.modules[m] = (factors[f"{m}.activation_eigenvectors"],
                                   factors[f"{m}.gradient_eigenvectors"],
                                   scaled, damping * scaled.mean())

    def with_damping(self, damping: float) -> EKFACPreconditioner:
        """The same factors and gain with another damping (the step study's damping axis)."""
        return EKFACPreconditioner(self.factors, self.gain, damping)

    def __call__(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for m, (qa, qg, scaled, lam) in self.modules.items():
            w = grads.get(f"{m}.weight")
            if w is None:
                raise KeyError(f"no gradient for EK-FAC module {m}")
            b = grads.get(f"{m}.bias")
            g = torch.cat([w, b[:, None]], 1) if b is not None else w
            dev = g.device
            qa, qg = qa.to(dev), qg.to(dev)
            rot = qg.T @ g @ qa
            rot = rot / (scaled.to(dev) + lam)
            nat = qg @ rot @ qa.T
            out[f"{m}.weight"] = nat[:, : w.shape[1]]
            if b is not None:
                out[f"{m}.bias"] = nat[:, -1]
        missing = set(grads) - set(out)
        if missing:
            raise KeyError(f"EK-FAC factors cover no module for {sorted(missing)[:3]}")
        return out


@torch.no_grad()
def apply_step(params: dict[str, nn.Parameter], direction: dict[str, torch.Tensor],
               eta: float) -> None:
    """θ ← θ + η · direction (ascent on the query loss)."""
    for n, p in params.items():
        p.add_(direction[n].to(p.dtype), alpha=eta)
