"""The student chooses on validation queries (held-out training queries), never on test ones;
its identity-initialised heads start exactly at the untuned features' ranking."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.callbacks import (
    ValidationCallback,
    feature_baseline,
    fullset_kset_map,
    kset_map,
    outside_samples,
    rank_all,
    sampled_kset_map,
)
from attribution.features.cache import space_dir
from attribution.student.head import HEADS, EmbeddingHead, head_dims
from attribution.student.train import split_validation, train_student
from tests.conftest import smoke_config


# ----------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("kind", ["linear", "residual"])
def test_identity_heads_rank_exactly_as_the_untuned_features(kind):
    g = torch.Generator().manual_seed(0)
    items, queries = torch.randn(300, 24, generator=g), torch.randn(12, 24, generator=g)
    teacher = rank_all(torch.randn(12, 24, generator=g), items)  # any reference ranking
    head = EmbeddingHead(head_dims(kind, 24, [32, 16]), 0.1, False, 5.0, kind).eval()
    with torch.no_grad():
        ours = rank_all(head.embed(queries), head.embed(items))
    raw = rank_all(F.normalize(queries, dim=-1), F.normalize(items, dim=-1))
    assert np.array_equal(ours, raw)  # the same ranking, item for item
    # hence step-0 mAP = untuned mAP exactly
    from attribution.callbacks import map_at_ks

    assert map_at_ks(ours, teacher, [5, 20]) == feature_baseline(items, queries, teacher, [5, 20])


def test_reference_mlp_does_not_start_at_the_features():
    g = torch.Generator().manual_seed(0)
    items, queries = torch.randn(300, 24, generator=g), torch.randn(12, 24, generator=g)
    torch.manual_seed(0)
    head = EmbeddingHead(head_dims("mlp", 24, [32, 16]), 0.0, False, 5.0, "mlp").eval()
    with torch.no_grad():
        ours = rank_all(head.embed(queries), head.embed(items))
    assert not np.array_equal(ours, rank_all(F.normalize(queries, dim=-1),
                                             F.normalize(items, dim=-1)))


def test_head_registry_and_shapes():
    assert set(HEADS) == {"mlp", "linear", "residual"}
    assert head_dims("linear", 8, [64]) == [8, 8]
    assert head_dims("residual", 8, [64, 32]) == [8, 64, 32, 8]
    assert head_dims("mlp", 8, [64, 32]) == [8, 64, 32]
    with pytest.raises(ValueError, match="layernorm"):
        EmbeddingHead([8, 8], kind="linear", layernorm=True)
    # the residual head's branch trains: after one step it is no longer the identity
    head = EmbeddingHead(head_dims("residual", 8, [16]), 0.0, False, 1.0, "residual")
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    (head.embed(x) * torch.randn(4, 8)).sum().backward()
    opt.step()
    assert not torch.allclose(head.embed(x), F.normalize(x, dim=-1))


# ------------------------------------------------------------------------------ validation
def test_kset_map_by_hand():
    # one query, K-set [7, 3, 9, 1] in the teacher's order; k = 2 positives {7, 3}
    q = torch.tensor([[1.0, 0.0]])
    items = torch.zeros(10, 2)
    items[9] = torch.tensor([1.0, 0.0])   # ranked 1st (not a positive)
    items[7] = torch.tensor([0.8, 0.6])   # 2nd (positive): precision 1/2
    items[1] = torch.tensor([0.6, 0.8])   # 3rd
    items[3] = torch.tensor([0.0, 1.0])   # 4th (positive): precision 2/4
    m, _ = kset_map(q, items, np.array([[7, 3, 9, 1]]), 2)
    assert m == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_fullset_validation_charges_items_from_outside_the_kset():
    # the same query and K-set as above, plus item 5 (OUTSIDE the K-set) ranked 2nd overall:
    # among all items the positives 7, 3 sit at ranks 3 and 5 -> (1/3 + 2/5) / 2
    q = torch.tensor([[1.0, 0.0]])
    items = torch.zeros(10, 2)
    items[9] = torch.tensor([1.0, 0.0])
    items[5] = torch.tensor([0.9, 0.1])
    items[7] = torch.tensor([0.8, 0.6])
    items[1] = torch.tensor([0.6, 0.8])
    items[3] = torch.tensor([0.0, 1.0])
    items[[0, 2, 4, 6, 8]] = torch.tensor([-1.0, 0.0])  # the rest last
    kset = np.array([[7, 3, 9, 1]])
    full, _ = fullset_kset_map(q, items, kset, 2)
    assert full == pytest.approx((1 / 3 + 2 / 5) / 2)
    within, _ = kset_map(q, items, kset, 2)  # the K-set-only figure cannot see item 5
    assert within == pytest.approx((1 / 2 + 2 / 4) / 2)
    cb = ValidationCallback(items, q, kset, 2, scope="full")
    assert cb.evaluate(lambda x: x)[0] == pytest.approx(full)
    assert ValidationCallback(items, q, kset, 2, scope="kset").evaluate(
        lambda x: x)[0] == pytest.approx(within)


def test_sampled_validation_charges_only_items_drawn_at_random_from_outside():
    # the same query and K-set as above; item 5 (outside, just below the top) is NOT in the
    # outside sample, item 0 (outside, drawn) is lifted above the positives: only item 0 counts
    q = torch.tensor([[1.0, 0.0]])
    items = torch.full((10, 2), -1.0)
    items[9] = torch.tensor([1.0, 0.0])
    items[5] = torch.tensor([0.95, 0.05])
    items[0] = torch.tensor([0.9, 0.1])
    items[7] = torch.tensor([0.8, 0.6])
    items[1] = torch.tensor([0.6, 0.8])
    items[3] = torch.tensor([0.0, 1.0])
    kset, outside = np.array([[7, 3, 9, 1]]), np.array([[0, 2, 4]])
    m, _ = sampled_kset_map(q, items, kset, outside, 2)
    # pool ranking: 9, 0, 7, 1, 3, (2, 4): positives 7, 3 at 3rd and 5th
    assert m == pytest.approx((1 / 3 + 2 / 5) / 2)
    cb = ValidationCallback(items, q, kset, 2, scope="sampled", outside=6, seed=0)
    assert cb.outside.shape == (1, 6) and not set(cb.outside[0]) & {7, 3, 9, 1}
    assert set(cb.outside[0]) == {0, 2, 4, 5, 6, 8}  # R >= N - K: every outside item
    # ...which makes it the full-set figure
    assert cb.evaluate(lambda x: x)[0] == pytest.approx(fullset_kset_map(q, items, kset, 2)[0])


def test_outside_samples_are_outside_distinct_and_seeded():
    ksets = np.stack([np.random.default_rng(i).permutation(100)[:20] for i in range(5)])
    a = outside_samples(ksets, 100, 30, seed=3)
    assert a.shape == (5, 30)
    for row, out in zip(ksets, a):
        assert not set(row) & set(out) and len(set(out)) == 30
    assert np.array_equal(a, outside_samples(ksets, 100, 30, seed=3))
    assert not np.array_equal(a, outside_samples(ksets, 100, 30, seed=4))


def test_split_is_fixed_disjoint_and_shared_across_data_scaling():
    val, train = split_validation(120, 0.1, seed=0)
    assert len(val) == 12 and len(train) == 108 and not set(val) & set(train)
    assert np.array_equal(val, split_validation(120, 0.1, seed=0)[0])
    assert len(split_validation(120, 20, seed=0)[0]) == 20  # a count
    assert not np.array_equal(val, split_validation(120, 0.1, seed=1)[0])
    assert len(split_validation(120, 0, seed=0)[0]) == 0


def test_validation_keeps_the_best_epoch_and_stops():
    """Known answer: a callback fed a scripted sequence of heads keeps the best one."""
    items = torch.randn(50, 4)
    queries = torch.randn(3, 4)
    ksets = np.stack([np.random.default_rng(i).permutation(50)[:10] for i in range(3)])
    cb = ValidationCallback(items, queries, ksets, 3, patience=2)

    class Fake:  # module.embed and module.head, as the callback uses them
        def __init__(self, w):
            self.head = torch.nn.Linear(4, 4, bias=False)
            with torch.no_grad():
                self.head.weight.copy_(w)

        def embed(self, x):
            return F.normalize(self.head(torch.as_tensor(x)), dim=-1)

    good = Fake(torch.eye(4))
    scores = []
    for epoch, w in enumerate([torch.randn(4, 4), torch.eye(4), torch.randn(4, 4),
                               torch.randn(4, 4)]):
        cb.consider(Fake(w), epoch)
        scores.append(cb.last[0])
    assert cb.best == max(scores) and cb.best_epoch == int(np.argmax(scores))
    if cb.best_epoch == 1:
        assert torch.equal(cb.best_state["weight"], good.head.weight)


@pytest.fixture(scope="module")
def student_inputs(smoke_run):
    smoke_run.run(["features", "teacher"])
    return smoke_run


def _train(pipe, out, *overrides, features=None, teacher=None):
    cfg = smoke_config(pipe.cfg.output_root, "student.logger=none", *overrides)
    return train_student(cfg, features or pipe.dir("features"), teacher or pipe.dir("teacher"),
                         out, progress=False)


def test_fitting_never_reads_the_test_queries(student_inputs, tmp_path):
    """Train twice: once as is, once with the test features and test rankings replaced by
    garbage.  Everything fitted (head weights, chosen epoch, validation history) is identical;
    only the reported test figures differ."""
    pipe = student_inputs
    a = _train(pipe, tmp_path / "a", "student.epochs=6")
    space = pipe.cfg.student.feature
    feats = tmp_path / "features"
    shutil.copytree(pipe.dir("features"), feats)
    qt = space_dir(feats, space) / "query_test.npy"
    np.save(qt, np.random.default_rng(1).standard_normal(np.load(qt).shape).astype(np.float32))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    shutil.copy(pipe.dir("teacher") / "influence_train.pkl", teacher)
    with open(pipe.dir("teacher") / "influence_test.pkl", "rb") as f:
        test = pickle.load(f)
    rng = np.random.default_rng(2)
    test["random"]["rank"] = np.stack([rng.permutation(r) for r in test["random"]["rank"]])
    with open(teacher / "influence_test.pkl", "wb") as f:
        pickle.dump(test, f)
    b = _train(pipe, tmp_path / "b", "student.epochs=6", features=feats, teacher=teacher)
    assert (tmp_path / "a" / "head.pt").read_bytes() == (tmp_path / "b" / "head.pt").read_bytes()
    assert a["selected_epoch"] == b["selected_epoch"] and a["val_history"] == b["val_history"]
    assert a["student.mAP@5"] != b["student.mAP@5"]  # the test figures did change


def test_early_stopping_and_time_budget(student_inputs, tmp_path):
    m = _train(student_inputs, tmp_path / "p", "student.epochs=80", "student.patience=2")
    assert m["epochs_run"] < 80 and 0 <= m["selected_epoch"] <= m["epochs_run"]
    # stopping came 2 epochs after the best one (or the best is the last)
    hist = m["val_history"]
    assert len(hist) == m["epochs_run"] + 1 and hist[m["selected_epoch"]] == max(hist)
    t = _train(student_inputs, tmp_path / "t", "student.epochs=5000", "student.max_minutes=0.002")
    assert t["epochs_run"] < 5000


def test_head_kind_round_trips_through_the_deployed_student(student_inputs, tmp_path):
    from attribution.student.deploy import load_head

    m = _train(student_inputs, tmp_path / "r", "student.epochs=2", "student.head=residual")
    head = load_head(tmp_path / "r")
    assert head.kind == "residual" and head.residual and m["head"] == "residual"
    meta = json.loads((tmp_path / "r" / "head.json").read_text())
    assert meta["dims"][0] == meta["dims"][-1]


def test_listwise_leaves_the_score_offset_untrained():
    """A softmax over each query's candidates ignores a common shift of the scores: β's gradient
    is rounding noise (Adam would turn it into full steps), so β is not in the optimizer."""
    from attribution.student.head import EmbeddingHead
    from attribution.student.losses import build_loss
    from attribution.student.module import StudentModule

    feats = torch.randn(20, 4)
    for name, trained in (("listwise", False), ("ce", True)):
        module = StudentModule(EmbeddingHead([4, 4], 0.0, kind="linear"), build_loss(name),
                               feats, feats[:3])
        params = module.configure_optimizers().param_groups[0]["params"]
        assert any(p is module.head.beta for p in params) == trained
        assert any(p is module.head.log_alpha for p in params)
