"""Whitening (``student.whiten``) and validation concepts (``world.planted[i].queries=val``):
known answers for both, and the held-out rows they rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.callbacks import rank_all
from attribution.common.seeds import seeded_generator
from attribution.config import ConfigError, load_config, val_concept_rows
from attribution.generator.queries import query_prompts
from attribution.student.head import EmbeddingHead, head_dims, whitening
from attribution.student.train import split_validation
from tests.conftest import smoke_config


def _rare_world(seed: int = 0, n: int = 400, rare: int = 6):
    """Items on 8 common directions (large variance) plus one RARE direction that only
    ``rare`` items carry, at an amplitude smaller than the common ones' spread."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, 8, generator=g) * 3.0
    flag = torch.zeros(n)
    flag[:rare] = 1.0
    items = torch.cat([common, flag[:, None] * 1.0, 0.05 * torch.randn(n, 3, generator=g)], 1)
    # a query that shares the rare direction with the first items and is otherwise generic
    query = torch.cat([torch.randn(1, 8, generator=g) * 3.0, torch.ones(1, 1),
                       torch.zeros(1, 3)], 1)
    return items, query, set(range(rare))


def test_whitening_is_the_shrunk_inverse_square_root_of_the_item_covariance():
    items = torch.randn(500, 6) @ torch.randn(6, 6) + 2.0
    mu, w = whitening(items, 1e-6)
    white = (items.double() - mu.double()) @ w.double()
    cov = white.T @ white / (len(items) - 1)
    assert torch.allclose(mu, items.mean(0), atol=1e-5)
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=1e-3)  # exact whitening
    assert torch.allclose(w, w.T, atol=1e-5)  # ZCA: symmetric, no rotation of the space
    _, w_big = whitening(items, 1e6)  # heavy shrinkage: a scaled identity
    assert torch.allclose(w_big / w_big[0, 0], torch.eye(6), atol=1e-3)
    with pytest.raises(ValueError, match="shrinkage"):
        whitening(items, 0.0)


def test_whitened_head_starts_at_the_whitened_ranking_and_finds_the_rare_items():
    """Known answer: the raw cosine ranks the rare direction's items low (the common
    directions swamp it); whitening scales that direction up, so they come first."""
    items, query, rare = _rare_world()
    raw = rank_all(F.normalize(query, dim=-1), F.normalize(items, dim=-1))[0]
    assert len(rare & set(raw[:10].tolist())) <= 2
    for kind in ("linear", "residual"):
        head = EmbeddingHead(head_dims(kind, items.shape[1], [16]), 0.0, kind=kind, whiten=True)
        head.set_whitening(*whitening(items, 1e-3))
        with torch.no_grad():
            ours = rank_all(head.embed(query), head.embed(items))[0]
        mu, w = whitening(items, 1e-3)
        by_hand = rank_all(F.normalize((query - mu) @ w, dim=-1),
                           F.normalize((items - mu) @ w, dim=-1))[0]
        assert np.array_equal(ours, by_hand)  # step 0 = the whitened features, item for item
        assert rare <= set(ours[:10].tolist())  # every rare item in the top 10


def test_whitening_round_trips_through_the_state_dict():
    items = torch.randn(100, 5)
    head = EmbeddingHead([5, 5], 0.0, kind="linear", whiten=True)
    head.set_whitening(*whitening(items, 1e-2))
    again = EmbeddingHead([5, 5], 0.0, kind="linear", whiten=True)
    again.load_state_dict(head.state_dict())
    assert torch.equal(again.embed(items), head.embed(items))
    with pytest.raises(ValueError, match="without whitening"):
        EmbeddingHead([5, 5], 0.0, kind="linear").set_whitening(*whitening(items, 1e-2))


def test_held_rows_are_always_validation_and_never_trained_on():
    held = [110, 111, 112, 113, 114, 115]
    val, train = split_validation(120, 0.1, seed=0, held=held)
    assert set(held) <= set(val) and not set(held) & set(train)
    assert len(val) == 12 and len(train) == 108  # the same budget as without held rows
    val0, train0 = split_validation(120, 0, seed=0, held=held)  # no validation: still unseen
    assert len(val0) == 0 and not set(held) & set(train0) and len(train0) == 114
    val_big, _ = split_validation(120, 3, seed=0, held=held)  # more held rows than asked for
    assert set(val_big) == set(held)
    # without held rows the split is the one every earlier run used
    plain, _ = split_validation(120, 0.1, seed=0)
    assert np.array_equal(plain, np.sort(torch.randperm(
        120, generator=seeded_generator(0, 79)).numpy()[:12]))


def test_validation_concepts_prompt_only_held_out_training_queries(tmp_path):
    cfg = load_config("configs/experiment/toy.yaml", [f"output_root={tmp_path}",
                                                       "queries.n_train=40", "queries.n_test=12",
                                                       "queries.planted_val=2"])
    rows = val_concept_rows(cfg)
    assert rows == [36, 37, 38, 39]  # the last rows: 2 per validation concept
    prompts = query_prompts(cfg)
    val_values = {(p.attribute, p.value) for p in cfg.world.planted if p.queries == "val"}
    test_values = {(p.attribute, p.value) for p in cfg.world.planted if p.queries == "test"}
    assert val_values and test_values
    carries = [i for i, a in enumerate(prompts["train"])
               if any(a[k] == v for k, v in val_values)]
    assert carries == rows
    assert not any(a[k] == v for a in prompts["train"] for k, v in test_values)
    assert not any(a[k] == v for a in prompts["test"] for k, v in val_values)
    assert sum(any(a[k] == v for k, v in test_values) for a in prompts["test"]) == 8
    released = load_config("configs/experiment/coco_released.yaml", [f"output_root={tmp_path}"])
    assert val_concept_rows(released) == []


def test_too_many_validation_concept_queries_fail_by_name(tmp_path):
    with pytest.raises(ConfigError, match="queries.planted_val"):
        smoke_config(tmp_path, "queries.planted_val=8")


def test_whitened_input_is_the_untrained_whitened_head(smoke_run):
    """Known answer: the ``whitened`` method row (the student's input whitened as its head is,
    untrained) ranks every test query exactly as a whitened linear head at its identity start;
    the student stage measures it beside the trained head, with its per-kind figures."""
    import json

    from attribution.features.cache import load_features, space_dir

    smoke_run.run(["student"])
    cfg = smoke_run.cfg
    assert cfg.student.whiten > 0  # the toy recipe whitens
    m = json.loads((smoke_run.dir("student") / "metrics.json").read_text())
    k = cfg.student.k_eval[0]
    assert f"baseline.whitened.mAP@{k}" in m and "baseline.whitened.queries_per_second" in m
    feats = load_features(space_dir(smoke_run.dir("features"), cfg.student.feature))
    items = torch.as_tensor(np.asarray(feats["items"]), dtype=torch.float32)
    queries = torch.as_tensor(np.asarray(feats["query_test"]), dtype=torch.float32)
    head = EmbeddingHead(head_dims("linear", items.shape[1], []), 0.0, kind="linear",
                         whiten=True).eval()
    head.set_whitening(*whitening(items, cfg.student.whiten))
    with torch.no_grad():
        want = rank_all(head.embed(queries), head.embed(items))
    got = np.load(smoke_run.dir("student") / "rank_whitened.npy")
    assert (got[:, :20] == want[:, :20]).mean() > 0.99  # float ties aside
    assert not np.array_equal(got, rank_all(F.normalize(queries, dim=-1),
                                            F.normalize(items, dim=-1)))
    smoke_run.run(["baselines"])
    metrics = smoke_run.write_metrics()
    assert f"baseline.whitened.planted.mAP@{k}" in metrics
