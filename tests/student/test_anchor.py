"""The head's anchor (``student.anchor``, L2-SP): the penalty's exact value, that training adds
it, and the known answer it exists for — a rare direction that no training query uses keeps
its place in the whitened identity only when the head is pulled toward its start."""

from __future__ import annotations

import pytest
import torch

from attribution.callbacks import rank_all
from attribution.config import load_config
from attribution.pipeline import Pipeline
from attribution.stage_table import key_sections
from attribution.student.data import PairPlan, collate_pairs
from attribution.student.head import EmbeddingHead, head_dims, whitening
from attribution.student.losses import build_loss
from attribution.student.module import StudentModule


def _world(seed: int = 0, n: int = 400, rare: int = 6, n_queries: int = 64):
    """Items on 8 common directions plus one RARE direction that only ``rare`` items carry;
    training queries that never use it, ranked by a hidden bilinear map of the common ones;
    a probe query that carries the rare direction (the planted concept's test query)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, 8, generator=g) * 3.0
    flag = torch.zeros(n)
    flag[:rare] = 1.0
    items = torch.cat([common, flag[:, None], 0.05 * torch.randn(n, 3, generator=g)], 1)
    queries = torch.cat([torch.randn(n_queries, 8, generator=g) * 3.0,
                         torch.zeros(n_queries, 4)], 1)
    probe = torch.cat([torch.randn(1, 8, generator=g) * 3.0, torch.ones(1, 1),
                       torch.zeros(1, 3)], 1)
    hidden = torch.randn(8, 8, generator=g)
    ranks = torch.argsort(-(queries[:, :8] @ hidden @ items[:, :8].T), dim=1)[:, :40].numpy()
    return items, queries, probe, ranks, set(range(rare))


def _module(items, queries, anchor: float) -> StudentModule:
    torch.manual_seed(0)
    head = EmbeddingHead(head_dims("linear", items.shape[1], [16]), 0.0, alpha_init=5.0,
                         kind="linear", whiten=True)
    head.set_whitening(*whitening(items, 1e-3))
    return StudentModule(head, build_loss("listwise"), items, queries, lr=1e-2, anchor=anchor)


def test_penalty_is_the_squared_distance_from_the_start_and_training_adds_it():
    items, queries, _, ranks, _ = _world()
    module = _module(items, queries, anchor=0.5)
    assert float(module.anchor_penalty().detach()) == 0.0  # at the start
    with torch.no_grad():
        module.head.net.weight.add_(0.1)
        module.head.net.bias.fill_(0.2)
    d = items.shape[1]
    penalty = float(module.anchor_penalty().detach())
    assert penalty == pytest.approx(d * d * 0.01 + d * 0.04, rel=1e-5)
    batch = collate_pairs([PairPlan(ranks, len(items), 16, 0.0, None, 0)[(0, i)]
                           for i in range(4)])
    module.log = lambda *a, **k: None  # no trainer attached
    data = module.loss_fn(module.scores(batch), batch["target"])["loss"]
    total = module.training_step(batch, 0)
    assert float(total.detach()) == pytest.approx(float(data.detach()) + 0.5 * penalty)
    # off: no buffers, nothing added; the starting weights never enter a checkpoint
    plain = _module(items, queries, anchor=0.0)
    assert float(plain.anchor_penalty()) == 0.0
    assert {n for n, _ in plain.named_buffers()} == {"head.center", "head.whitener"}
    assert not any(k.startswith("_start") for k in module.state_dict())
    with pytest.raises(ValueError, match="anchor"):
        _module(items, queries, anchor=-1.0)


def _train(anchor: float, steps: int = 300):
    items, queries, probe, ranks, rare = _world()
    module = _module(items, queries, anchor)
    batch = collate_pairs([PairPlan(ranks, len(items), 64, 0.1, None, 0)[(0, i)]
                           for i in range(len(queries))])
    module.log = lambda *a, **k: None  # no trainer attached
    opt = module.configure_optimizers()
    for _ in range(steps):  # the module's own step: data loss + the pull
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top = rank_all(module.head.embed(probe), module.head.embed(items))[0][:10]
    return float(module.head.net.weight[8, 8].detach()), len(rare & set(top.tolist()))


def test_anchor_keeps_the_direction_no_training_query_uses():
    """Known answer: the whitened identity puts all 6 rare items in the probe's top 10; without
    the anchor, training (where the rare direction is noise) shrinks it well below 1; with it,
    the direction stays near 1 and the probe still finds every rare item."""
    free_gain, _ = _train(0.0)
    kept_gain, kept_found = _train(0.1)
    assert free_gain < 0.5
    assert kept_gain > 0.9 and kept_found == 6


def test_anchor_zero_keeps_the_student_cache_key(tmp_path):
    """Added after runs were cached: at 0 it is left out of the student's key (so a run cached
    before the key existed stays valid); at any other value it is in it."""
    def cfg(value):
        return load_config("configs/experiment/toy.yaml", [f"output_root={tmp_path}",
                                                            f"student.anchor={value}"])
    assert "anchor" not in key_sections(cfg(0.0), "student")[0]
    assert key_sections(cfg(0.01), "student")[0]["anchor"] == 0.01
    assert Pipeline(cfg(0.0)).key("student") != Pipeline(cfg(0.01)).key("student")
    assert Pipeline(cfg(0.0)).key("teacher") == Pipeline(cfg(0.01)).key("teacher")
