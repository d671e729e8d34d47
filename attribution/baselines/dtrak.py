"""D-TRAK: gradient features of ‖ε_θ(x_t, t, c)‖², randomly projected, kernel-regression scores.

For every training item j and every query q the feature is

    φ(x) = Pᵀ · mean_t ∇_θ ‖ε_θ(x_t, t, c)‖²,   x_t = √ᾱ_t z + √(1−ᾱ_t) ε,

with θ the parameters of ``params`` (a group of teacher/params.py), ε a function of (item, t) only
and P a (|θ|, d) random Gaussian projection (scaled by 1/√d) generated from the seed.  Scores are

    τ(q, j) = φ(q)ᵀ (ΦᵀΦ + λ I)⁻¹ φ(j),   λ = damping · tr(ΦᵀΦ) / d,

higher = more influential (the project's sign convention).  The training side (Φ, the solve) is
computed once; a query costs ``len(timesteps)`` per-sample gradients, one projection and one
(d × N) product.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from attribution.common.seeds import seeded_generator
from attribution.config import BaselinesConfig
from attribution.teacher.params import select_parameters


class Projector:
    """A fixed random Gaussian (P, d) projection, stored per parameter tensor, scaled 1/√d."""

    def __init__(self, shapes: dict[str, torch.Size], d: int, seed: int):
        self.d = d
        self.mats = {}
        for i, (name, shape) in enumerate(shapes.items()):
            g = seeded_generator(seed, 83, i)
            self.mats[name] = torch.randn(int(torch.Size(shape).numel()), d, generator=g) / d**0.5

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, *shape)} -> (B, d)."""
        out = None
        for name, m in self.mats.items():
            g = grads[name].flatten(1)
            part = g @ m.to(g.device)
            out = part if out is None else out + part
        return out


def _output_norm_grads(unet: nn.Module, names: list[str], alphas_cumprod: torch.Tensor):
    """(z, cond, t, eps) batches -> {name: (B, *shape)} per-item ∇θ ‖ε_θ(x_t, t, c)‖²."""
    from attribution.teacher.fisher import per_sample_grads

    return per_sample_grads(unet, names, alphas_cumprod, lambda pred, eps: pred.pow(2).sum())


def _noise(ids: torch.Tensor, t: int, shape: tuple[int, ...], seed: int, tag: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=seeded_generator(seed, 89, tag, int(i), t))
                        for i in ids.tolist()])


def kernel_regression(phi_train: torch.Tensor, damping: float) -> torch.Tensor:
    """(ΦᵀΦ + λI)⁻¹ Φᵀ, λ = damping · tr(ΦᵀΦ)/d, solved in float64: (N, d) -> (d, N)."""
    phi = phi_train.double()
    gram = phi.T @ phi
    lam = damping * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, phi.T).float()


class DTRAK:
    """Featurizes items and queries; scores queries against the indexed training set."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, bc: BaselinesConfig,
                 seed: int = 0):
        self.unet = unet.eval()
        self.timesteps, self.proj_dim = tuple(bc.dtrak_timesteps), bc.dtrak_proj_dim
        self.batch_size, self.damping, self.seed = bc.dtrak_batch_size, bc.dtrak_damping, seed
        self.alphas = alphas_cumprod
        params = select_parameters(unet, bc.dtrak_params)
        self.names = list(params)
        self.grad_fn = _output_norm_grads(unet, self.names, alphas_cumprod)
        self.project = Projector({n: p.shape for n, p in params.items()}, bc.dtrak_proj_dim, seed)
        self.kernel_phi: torch.Tensor | None = None  # (d, N) = (ΦᵀΦ + λI)⁻¹ Φᵀ

    def featurize(self, z: torch.Tensor, cond: torch.Tensor, ids: torch.Tensor,
                  tag: int = 0) -> torch.Tensor:
        """φ for a batch: z (B, C, h, w), cond (B, L, D), ids (B,) seed each item's noise;
        ``tag`` separates the noise of training items (0) and queries (1).  -> (B, d)."""
        acc = torch.zeros(len(z), self.proj_dim)
        shape = tuple(z.shape[1:])
        for t in self.timesteps:
            eps = _noise(ids, t, shape, self.seed, tag)
            tt = torch.full((len(z),), t, dtype=torch.long)
            acc += self.project(self.grad_fn(z, cond, tt, eps))
        return acc / len(self.timesteps)

    def featurize_all(self, z: torch.Tensor, cond: torch.Tensor, tag: int = 0,
                      progress: bool = False) -> torch.Tensor:
        from tqdm import tqdm

        out = []
        starts = range(0, len(z), self.batch_size)
        for s in tqdm(starts, desc="D-TRAK features", disable=not progress, leave=False):
            e = min(s + self.batch_size, len(z))
            out.append(self.featurize(z[s:e], cond[s:e], torch.arange(s, e), tag))
        phi = torch.cat(out)
        if not torch.isfinite(phi).all():
            raise FloatingPointError("non-finite D-TRAK features")
        return phi

    def fit(self, phi_train: torch.Tensor) -> None:
        self.kernel_phi = kernel_regression(phi_train, self.damping)

    def scores(self, phi_query: torch.Tensor) -> torch.Tensor:
        """(Q, d) -> (Q, N) scores, higher = more influential."""
        if self.kernel_phi is None:
            raise RuntimeError("call fit() on the training features first")
        return phi_query @ self.kernel_phi

    def seconds_per_query(self, z: torch.Tensor, cond: torch.Tensor, n: int = 3) -> float:
        """A query's cost once the training side is fitted: featurize + score, one at a time."""
        start = time.perf_counter()
        for i in range(min(n, len(z))):
            self.scores(self.featurize(z[i : i + 1], cond[i : i + 1], torch.tensor([i]), 1))
        return (time.perf_counter() - start) / min(n, len(z))
