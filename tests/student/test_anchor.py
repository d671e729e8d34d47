"""The head's anchor (``student.anchor``, L2-SP): the penalty's exact value, that training adds
it, and the known answer it exists for — a rare direction that no training query uses keeps
its place in the whitened identity only when the head is pulled toward its start."""

from __future__ import annotations

import pytest
import torch

from attribution.callbacks import rank_all
from attribution.config import ConfigError, load_config
from attribution.pipeline import Pipeline
from attribution.stage_table import key_sections
from attribution.student.data import PairPlan, collate_pairs
from attribution.student.head import EmbeddingHead, head_dims, query_metric, whitening
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


def _module(items, queries, anchor: float, basis: str = "uniform") -> StudentModule:
    torch.manual_seed(0)
    head = EmbeddingHead(head_dims("linear", items.shape[1], [16]), 0.0, alpha_init=5.0,
                         kind="linear", whiten=True)
    head.set_whitening(*whitening(items, 1e-3))
    metric = query_metric(queries, head.center, head.whitener) if basis == "queries" else None
    return StudentModule(head, build_loss("listwise"), items, queries, lr=1e-2, anchor=anchor,
                         anchor_metric=metric)


def test_penalty_is_the_relative_squared_distance_from_the_start_and_training_adds_it():
    items, queries, _, ranks, _ = _world()
    module = _module(items, queries, anchor=0.5)
    assert float(module.anchor_penalty().detach()) == 0.0  # at the start
    with torch.no_grad():
        module.head.net.weight.add_(0.1)
        module.head.net.bias.fill_(0.2)
    d = items.shape[1]
    penalty = float(module.anchor_penalty().detach())
    # relative to the identity's own ‖θ₀‖² = d (the bias starts at zero)
    assert penalty == pytest.approx((d * d * 0.01 + d * 0.04) / d, rel=1e-5)
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


def _train(anchor: float, steps: int = 300, basis: str = "uniform"):
    items, queries, probe, ranks, rare = _world()
    module = _module(items, queries, anchor, basis)
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
        fit = float(module.loss_fn(module.scores(batch), batch["target"])["loss"])
    return float(module.head.net.weight[8, 8].detach()), len(rare & set(top.tolist())), fit


def test_anchor_keeps_the_direction_no_training_query_uses():
    """Known answer: the whitened identity puts all 6 rare items in the probe's top 10; without
    the anchor, training (where the rare direction is noise) shrinks it well below 1; with it,
    the direction stays near 1 and the probe still finds every rare item."""
    free_gain, _, _ = _train(0.0)
    kept_gain, kept_found, _ = _train(1.2)  # 0.1 x ‖θ₀‖² = 12
    assert free_gain < 0.5
    assert kept_gain > 0.9 and kept_found == 6


def test_anchor_is_part_of_the_student_key_only(tmp_path):
    """The anchor changes the student's key and no other stage's; a shaped pull without an
    anchor is refused at load, not when the student stage starts after hours of teacher."""
    def cfg(*over):
        return load_config("configs/experiment/toy.yaml", [f"output_root={tmp_path}", *over])

    assert key_sections(cfg("student.anchor=0.01"), "student")[0]["anchor"] == 0.01
    assert Pipeline(cfg("student.anchor=0")).key("student") != Pipeline(
        cfg("student.anchor=0.01")).key("student")
    assert Pipeline(cfg("student.anchor=0")).key("teacher") == Pipeline(
        cfg("student.anchor=0.01")).key("teacher")
    assert Pipeline(cfg("student.anchor_basis=queries")).key("student") != Pipeline(
        cfg()).key("student")
    with pytest.raises(ConfigError, match="student.anchor > 0"):
        cfg("student.anchor=0", "student.anchor_basis=queries")


def test_query_metric_pulls_fully_where_no_query_goes():
    """Known values: queries on the first two of four axes, equally → C = diag(a, a, 0, 0),
    c̄ = a/2, P = (I + C/c̄)⁻¹ = diag(1/3, 1/3, 1, 1); and the penalty it shapes is tr(ΔPΔᵀ)
    on the first layer's weight, plain ‖Δ‖² on the rest."""
    queries = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [-2.0, 0, 0, 0], [0, -2.0, 0, 0]])
    metric = query_metric(queries)
    assert torch.allclose(metric, torch.diag(torch.tensor([1 / 3, 1 / 3, 1.0, 1.0])), atol=1e-6)
    items = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    head = EmbeddingHead([4, 4], 0.0, kind="linear")
    module = StudentModule(head, build_loss("listwise"), items, queries, anchor=1.0,
                           anchor_metric=metric)
    delta = torch.arange(16.0).reshape(4, 4) / 10
    with torch.no_grad():
        head.net.weight.add_(delta)
        head.net.bias.fill_(0.5)
    expected = (float(((delta @ metric) * delta).sum()) + 4 * 0.25) / 4  # relative: ‖I‖² = 4
    assert float(module.anchor_penalty().detach()) == pytest.approx(expected, rel=1e-5)
    # the metric and the starting weights are not checkpointed, and no weight is registered twice
    assert set(module.state_dict()) == {f"head.{k}" for k in head.state_dict()}
    assert {n for n, _ in module.named_parameters()} == {f"head.{n}" for n, _ in
                                                         head.named_parameters()}
    with pytest.raises(ValueError, match="does not fit"):
        StudentModule(EmbeddingHead([4, 4], 0.0, kind="linear"), build_loss("listwise"), items,
                      queries, anchor=1.0, anchor_metric=torch.eye(3))
    with pytest.raises(ValueError, match="anchor > 0"):
        StudentModule(EmbeddingHead([4, 4], 0.0, kind="linear"), build_loss("listwise"), items,
                      queries, anchor=0.0, anchor_metric=metric)
    with pytest.raises(ValueError, match="all zero"):
        query_metric(torch.zeros(3, 4))


def test_query_shaped_anchor_keeps_the_rare_direction_and_frees_the_rest():
    """Known answer on the same world: at a pull that keeps the rare direction, the uniform
    anchor also holds back the directions the training queries use, so the teacher's ranking
    of them is fitted worse than with no pull; shaped by the queries, the pull keeps the rare
    direction (the probe still finds all 6 items) and fits the training ranking better."""
    _, _, free_fit = _train(0.0)
    u_gain, u_found, u_fit = _train(1.2)
    q_gain, q_found, q_fit = _train(1.2, basis="queries")
    assert q_gain > 0.9 and q_found == 6 and u_found == 6
    assert u_fit > free_fit + 0.1  # the uniform pull costs the fit...
    assert q_fit < u_fit - 0.05  # ...the shaped one less
