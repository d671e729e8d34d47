"""The recovery benchmark's synthetic sets (benchmarks/student_recovery.py): released layout,
stage-1 by raw cosine, and references that mean what they say."""

import pickle

import numpy as np
import pytest

from attribution.student.data import load_rankings
from attribution.student.train import _checked_features
from benchmarks.student_recovery import MAPS, SPACE, HiddenWorld, _unit, write_recovery_set

SMALL = dict(n_items=500, dim=160, q_train=12, k=40, q_test=6, eval_k=20)


@pytest.mark.parametrize("kind", MAPS)
def test_set_reads_as_released_and_stage1_is_raw_cosine(tmp_path, kind):
    ref = write_recovery_set(tmp_path, kind, noise=0.25, **SMALL)
    feats = _checked_features(tmp_path / "feats", SPACE, released=True)
    ranks = load_rankings(tmp_path, 500)
    assert ranks.train.shape == (12, 40) and ranks.test.shape == (6, 500)
    # each training query's K-set is exactly its K nearest items by raw cosine
    raw = _unit(feats["query_train"].numpy()) @ _unit(feats["items"].numpy()).T
    nearest = np.argsort(-raw, axis=1)[:, :40]
    assert all(set(a) == set(b) for a, b in zip(ranks.train, nearest))
    with open(tmp_path / "influence_train.pkl", "rb") as f:
        train = pickle.load(f)["random"]
    # the stored order is the stored (noisy) influence's order
    inf = train["influence_subset"]
    assert (np.diff(np.take_along_axis(inf, train["rank_influence_subset"], 1), axis=1)
            <= 0).all()
    assert ref["oracle"]["mAP@20"] > ref["raw"]["mAP@20"]


@pytest.mark.parametrize("kind", MAPS)
def test_without_teacher_noise_the_oracle_is_exact(tmp_path, kind):
    ref = write_recovery_set(tmp_path, kind, noise=0.0, **SMALL)
    assert ref["oracle"]["mAP@20"] == pytest.approx(1.0)
    assert ref["raw"]["mAP@20"] < 0.9  # the hidden map is not the raw geometry


def test_ignored_dimensions_are_invisible_to_raw_cosine():
    world = HiddenWorld("ignored", 1280, seed=0)
    f = world.features(2000)
    main, extra = f[:, : world.main], f[:, world.main:]
    # the extra block carries < 1 % of the raw energy but a large share of the influence code
    assert (extra ** 2).sum() / (f ** 2).sum() < 0.01
    h = world.code(f)
    assert (h[:, world.latent:] ** 2).sum() / (h ** 2).sum() > 0.25
    assert main.shape[1] + extra.shape[1] == 1280


@pytest.mark.parametrize("stage1", ["same", "other", "random"])
def test_default_validation_prefers_the_head_that_is_better_on_test(stage1):
    """Known answer on a set whose hidden map is known (linear): the untrained head (raw
    cosine, "epoch 0") against the hidden map itself (the best head there is).  The test
    queries — ranked by the teacher over every item — say the map is better; the default
    validation (held-out training queries, the K-set's top k_val ranked among the K-set; and
    among it and as many items drawn from outside it) must say so too, however stage 1 picked
    the K-set.
    Ranking every item with half the K-set positive (the old ``full`` scope at k_val = K/2)
    prefers raw cosine when stage 1 used the same features: the bias this default removes."""
    import torch
    import torch.nn.functional as F

    from attribution.callbacks import ValidationCallback, map_at_ks, rank_all
    from attribution.config import validation_k
    from benchmarks.student_recovery import make_recovery_set

    s = make_recovery_set("linear", n_items=3000, dim=160, q_train=240, k=200, q_test=40,
                          noise=0.25, seed=0, stage1=stage1)
    world = HiddenWorld("linear", 160, seed=0)

    def raw(x):
        return F.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float32), dim=-1)

    def oracle(x):  # the hidden map h = M f, the teacher's own geometry
        return torch.from_numpy(world.code(np.asarray(x, dtype=np.float32))).float()

    items = s["items"]
    test = {name: map_at_ks(rank_all(e(s["test_q"]), e(items)), s["test_rank"], [30])[
        "mAP@30"] for name, e in (("raw", raw), ("oracle", oracle))}
    assert test["oracle"] > test["raw"] + 0.1
    val = np.arange(200, 240)  # held-out training queries
    k_val = validation_k(None, [30], 200)
    cb = ValidationCallback(items, s["train_q"][val], s["train_rank"][val], k_val)
    assert cb.scope == "kset" and k_val == 20  # the default rule
    sampled = ValidationCallback(items, s["train_q"][val], s["train_rank"][val], k_val,
                                 scope="sampled")
    assert sampled.evaluate(oracle)[0] > sampled.evaluate(raw)[0]
    assert cb.evaluate(oracle)[0] > cb.evaluate(raw)[0]
    if stage1 == "same":
        old = ValidationCallback(items, s["train_q"][val], s["train_rank"][val], 100,
                                 scope="full")
        assert old.evaluate(raw)[0] > old.evaluate(oracle)[0]
