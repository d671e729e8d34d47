"""The shared embedding head, its kinds (a name -> builder registry), and the pair score.

Sign convention (explicit, and the same from the first step): a HIGHER score means MORE
influential.  s(q, x) = α · cos(f(q), f(x)) + β with α = exp(log_α) > 0, so ranking by s is
ranking by cos(f(q), f(x)) descending: retrieval is a plain maximum-inner-product search over
L2-normalized embeddings.  (The reference trains "low score = influential" with α initialised
to +1 and ranks ascending, which is right only once α has turned negative; docs/method.md §3.)

Kinds (``student.head``):

* ``mlp`` — the reference head: Linear → ReLU → Dropout → ... → Linear, random init.  At step 0
  it ranks by a random projection of the features.
* ``linear`` — one D → D linear map initialised to the identity: f(x) = W x + b, W₀ = I, b₀ = 0.
* ``residual`` — f(x) = x + g(x), g an MLP (D → hidden... → D) whose LAST layer starts at zero.

For ``linear`` and ``residual``, f = identity at step 0, so cos(f(q), f(x)) = cos(q, x): the
untrained student ranks exactly as the untuned features do, and a feature direction that no
training query exercises keeps its raw similarity instead of being thrown away.

Whitening (``student.whiten`` = s > 0): a fixed first map x → (x − μ) W, W = V diag((λ + s·λ_max)^-½) Vᵀ
from the eigendecomposition Σ = V diag(λ) Vᵀ of the TRAINING ITEMS' feature covariance (no
labels, no queries).  It is the feature-space analogue of inverse document frequency: a
direction few items vary along (a rare caption token, a rare shape) is scaled up, so sharing a
rare attribute counts for more than sharing a common one — as it does for the teacher, whose
unlearning step moves the few items that carry a rare token most.  Then the head (from the
identity) ranks at step 0 exactly as the whitened features do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(dims: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _build_mlp(dims: list[int], dropout: float) -> tuple[nn.Module, bool]:
    return _mlp(dims, dropout), False


def _build_linear(dims: list[int], dropout: float) -> tuple[nn.Module, bool]:
    if len(dims) != 2 or dims[0] != dims[1]:
        raise ValueError(f"a linear head maps D -> D (identity init), got dims {dims}")
    lin = nn.Linear(dims[0], dims[0])
    with torch.no_grad():
        lin.weight.copy_(torch.eye(dims[0]))
        lin.bias.zero_()
    return lin, False


def _build_residual(dims: list[int], dropout: float) -> tuple[nn.Module, bool]:
    if dims[0] != dims[-1] or len(dims) < 2:
        raise ValueError(f"a residual head maps D -> ... -> D, got dims {dims}")
    branch = _mlp(dims, dropout)
    with torch.no_grad():  # the branch starts at exactly zero: f = identity
        branch[-1].weight.zero_()
        branch[-1].bias.zero_()
    return branch, True


# name -> builder(dims, dropout) -> (network, residual?)
HEADS: dict[str, Callable[[list[int], float], tuple[nn.Module, bool]]] = {
    "mlp": _build_mlp, "linear": _build_linear, "residual": _build_residual}


def head_dims(kind: str, in_dim: int, hidden: list[int]) -> list[int]:
    """The head's layer widths [D_in, ..., D_out] for ``student.hidden`` (the layers after the
    input): as given for ``mlp``; [D, D] for ``linear`` (hidden unused); [D, *hidden, D] for
    ``residual`` (it must return to D to add the input)."""
    if kind == "linear":
        return [in_dim, in_dim]
    if kind == "residual":
        return [in_dim, *hidden, in_dim]
    return [in_dim, *hidden]


def whitening(items: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ (D,), W (D, D)) of the shrunk ZCA whitening x → (x − μ) W of ``items`` (N, D):
    W = V diag((λ + s·λ_max)^-½) Vᵀ; s > 0 bounds the gain of the rarest direction at
    (s·λ_max)^-½ (s → 0 is exact whitening, s → ∞ the centred features up to scale)."""
    if shrinkage <= 0:
        raise ValueError(f"whitening shrinkage must be > 0, got {shrinkage}")
    x = items.detach().to(torch.float64)
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / max(1, x.shape[0] - 1)
    lam, vec = torch.linalg.eigh(cov)
    lam = lam.clamp_min(0.0)
    top = float(lam.max())
    if not top > 0:
        raise ValueError("cannot whiten features with zero variance")
    w = vec @ torch.diag((lam + shrinkage * top).rsqrt()) @ vec.T
    return mu.to(torch.float32), w.to(torch.float32)


def query_metric(queries: torch.Tensor, center: torch.Tensor | None = None,
                 whitener: torch.Tensor | None = None) -> torch.Tensor:
    """P = (I + C/c̄)⁻¹ (D, D), the anchor's metric in the head's input space
    (``student.anchor_basis: queries``): C = the training queries' second moment there (after
    the head's whitening when ``center``/``whitener`` are given), c̄ = tr(C)/D its mean
    eigenvalue.  Along a direction no training query carries (a concept none of them names)
    P = 1, the full pull; along one they use as much as an average direction, ½; the more they
    use it, the freer the head is to move it — the training signal, not the pull, decides there.
    """
    q = queries.detach().to(torch.float64)
    if center is not None:
        q = (q - center.to(q)) @ whitener.to(q)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"need a (Q, D) matrix of training queries, got shape {tuple(q.shape)}")
    c = q.T @ q / q.shape[0]
    mean = float(torch.trace(c)) / c.shape[0]
    if not mean > 0:
        raise ValueError("the training queries' features are all zero: no metric to take")
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    return torch.linalg.inv(eye + c / mean).to(torch.float32)


class EmbeddingHead(nn.Module):
    """f: (B, D_in) -> (B, D_out), shared by queries and training items.

    Args:
        dims: [D_in, h1, ..., D_out] (see :func:`head_dims`); ReLU + dropout between layers.
        layernorm: LayerNorm on the input features (for ``residual``: on the branch's input only,
            so the identity path stays exact).
        kind: a :data:`HEADS` name.
        whiten: a fixed whitening map in front (buffers ``center`` and ``whitener``, set by
            :meth:`set_whitening` or loaded with the state dict).
    """

    def __init__(self, dims: list[int], dropout: float = 0.1, layernorm: bool = False,
                 alpha_init: float = 1.0, kind: str = "mlp", whiten: bool = False):
        super().__init__()
        self.whiten = bool(whiten)
        if self.whiten:  # identity until set: a state dict or set_whitening fills them
            self.register_buffer("center", torch.zeros(dims[0]))
            self.register_buffer("whitener", torch.eye(dims[0]))
        if len(dims) < 2:
            raise ValueError("head dims need at least [D_in, D_out]")
        if kind not in HEADS:
            raise ValueError(f"unknown head kind {kind!r}; kinds are {sorted(HEADS)}")
        net, self.residual = HEADS[kind](list(dims), dropout)
        if layernorm:  # flat, so state-dict keys stay those of the reference layout
            if not isinstance(net, nn.Sequential):
                raise ValueError(f"layernorm is not offered for the {kind} head (it would "
                                 "change the identity it starts from)")
            net = nn.Sequential(nn.LayerNorm(dims[0]), *net)
        self.net = net
        if alpha_init <= 0:
            raise ValueError("alpha_init must be positive (higher score = more influential)")
        self.log_alpha = nn.Parameter(torch.tensor(float(alpha_init)).log())
        self.beta = nn.Parameter(torch.zeros(()))
        self.kind, self.in_dim, self.out_dim = kind, dims[0], dims[-1]

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """L2-normalized embeddings (B, D_out): the vectors that go into the index."""
        if feats.shape[-1] != self.in_dim:
            raise ValueError(f"head expects {self.in_dim}-d features, got {feats.shape[-1]}")
        if self.whiten:
            feats = (feats - self.center) @ self.whitener
        out = self.net(feats)
        return F.normalize(feats + out if self.residual else out, dim=-1)

    def set_whitening(self, center: torch.Tensor, whitener: torch.Tensor) -> None:
        if not self.whiten:
            raise ValueError("this head was built without whitening (whiten=False)")
        if center.shape != self.center.shape or whitener.shape != self.whitener.shape:
            raise ValueError(f"whitening of shape {tuple(whitener.shape)} does not fit a "
                             f"{self.in_dim}-d head")
        with torch.no_grad():
            self.center.copy_(center)
            self.whitener.copy_(whitener)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def score(self, eq: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        """s = α·cos + β for embedded queries (B, D) and items (B, P, D) -> (B, P)."""
        return self.alpha * torch.einsum("bd,bpd->bp", eq, ex) + self.beta

    def flops_per_row(self) -> int:
        """Multiply-adds × 2 of one forward row through the linear layers (for FLOP/s)."""
        fixed = 2 * self.in_dim * self.in_dim if self.whiten else 0
        return fixed + sum(2 * m.in_features * m.out_features for m in self.modules()
                           if isinstance(m, nn.Linear))
