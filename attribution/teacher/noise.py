"""Noise that is a function of (item id, flip, caption index, t) only.

So before/after losses see the same ε, and no result depends on batch size, order or device.

Candidate noise is *counter-based*: every element of ε for the sample (item, flip, caption, t)
is computed from the integers (seed, item, flip, caption, t, element index) by a hash, so a
batch of any size is generated in one vectorised pass on the device that uses it — no
per-sample generator (a MSCOCO test query has ~24 million samples).  The hash is a 32-bit
integer mixer (Wellons' "lowbias32": x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b;
x ^= x>>16) chained over the key's fields; two hashed 24-bit uniforms u1, u2 ∈ (0, 1) give a
pair of normals by Box–Muller, √(−2 ln u1)·(cos 2πu2, sin 2πu2) (|ε| ≤ 5.9 at the 2⁻²⁵
resolution, a tail of 10⁻⁸).  tests/teacher/test_noise.py checks the moments, the independence
of neighbouring keys and elements, and that a batch of one equals the same row in a batch of
many, on every device.
"""

from __future__ import annotations

import torch

from attribution.common.seeds import seeded_generator
from attribution.teacher.formats import NOISE_VERSION  # noqa: F401  (the format's name)

_MASK = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values (the low 32 bits of each product are
    kept, so int64 wrap-around cannot change them)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def _row_hash(keys: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """One 32-bit hash per row of ``keys`` (int (B, F)), chained over its fields."""
    h = _hash32(torch.full((keys.shape[0],), (int(seed) * 1_000_003 + stream) & _MASK,
                           dtype=torch.int64, device=keys.device))
    for f in range(keys.shape[1]):
        h = _hash32(h ^ (keys[:, f] & _MASK))
    return h


def counter_normal(keys: torch.Tensor, numel: int, seed: int, stream: int = 23) -> torch.Tensor:
    """float32 (B, numel) standard normals, a function of (seed, stream, each row of ``keys``,
    element index) only, generated on ``keys``' device."""
    keys = keys.to(torch.int64)
    pairs = (numel + 1) // 2
    idx = torch.arange(2 * pairs, dtype=torch.int64, device=keys.device)
    element = _hash32(idx * 0x9E3779B1 & _MASK)  # decorrelate neighbouring indices
    h = _hash32(_row_hash(keys, seed, stream)[:, None] ^ element[None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)  # (0, 1), 2^24 levels
    u1, u2 = u[:, 0::2], u[:, 1::2]
    r = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * torch.pi) * u2
    z = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1).flatten(1)
    return z[:, :numel]


def item_noise(keys: torch.Tensor, shape: tuple[int, ...], seed: int,
               device: str | torch.device | None = None) -> torch.Tensor:
    """ε for each row (item, flip, caption, t) of ``keys`` (int (B, 4)); float (B, *shape), on
    ``device`` (default: ``keys``' device)."""
    keys = torch.as_tensor(keys)
    if device is not None:
        keys = keys.to(device)
    numel = 1
    for s in shape:
        numel *= int(s)
    return counter_normal(keys, numel, seed).view(len(keys), *shape)


def query_draws(query_id: int, n: int, num_timesteps: int, shape: tuple[int, ...],
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, ε) draws of a query's unlearning gradient: ((n,), (n, *shape))."""
    g = seeded_generator(seed, 29, query_id)
    t = torch.randint(num_timesteps, (n,), generator=g)
    return t, torch.randn((n, *shape), generator=g)
