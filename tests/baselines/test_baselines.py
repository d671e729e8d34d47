import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.baselines.dtrak import DTRAK, Projector, kernel_regression
from attribution.config import BaselinesConfig
from attribution.generator.model import add_noise, build_codec, build_scheduler, build_unet
from attribution.teacher.params import select_parameters
from tests.conftest import smoke_config


def _tiny(tmp_path):
    cfg = smoke_config(tmp_path)
    torch.manual_seed(0)
    unet = build_unet(cfg.generator, build_codec(cfg.generator, 16)).eval()
    return cfg, unet, build_scheduler(cfg.generator).alphas_cumprod


def _batch(n, cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, 16, 16, generator=g)
    cond = torch.randn(n, 20, cfg.generator.unet.cross_attention_dim, generator=g)
    return z, cond


def test_dtrak_feature_equals_projected_autograd_gradient(tmp_path):
    """φ(x) = Pᵀ mean_t ∇θ‖ε_θ(x_t)‖², checked against a plain autograd loop."""
    cfg, unet, alphas = _tiny(tmp_path)
    s = BaselinesConfig(dtrak_timesteps=[100, 700], dtrak_proj_dim=16)
    dt = DTRAK(unet, alphas, s)
    z, cond = _batch(3, cfg)
    fast = dt.featurize(z, cond, torch.arange(3))
    params = select_parameters(unet, s.dtrak_params)
    from attribution.baselines.dtrak import _noise

    for i in range(3):
        acc = torch.zeros(s.dtrak_proj_dim)
        for t in s.dtrak_timesteps:
            eps = _noise(torch.tensor([i]), t, (3, 16, 16), 0, 0)
            tt = torch.tensor([t])
            unet.zero_grad()
            for p in params.values():
                p.requires_grad_(True)
            unet(add_noise(alphas, z[i : i + 1], eps, tt), tt, cond[i : i + 1]).sample.pow(
                2).sum().backward()
            acc += dt.project({n: p.grad[None] for n, p in params.items()})[0]
        torch.testing.assert_close(fast[i], acc / len(s.dtrak_timesteps), rtol=1e-3, atol=1e-5)


def test_kernel_scores_match_the_formula():
    rng = np.random.default_rng(0)
    phi, q = rng.normal(size=(20, 6)), rng.normal(size=(3, 6))
    kernel = kernel_regression(torch.from_numpy(phi).float(), 0.01)
    gram = phi.T @ phi
    lam = 0.01 * np.trace(gram) / 6
    ref = q @ np.linalg.solve(gram + lam * np.eye(6), phi.T)
    np.testing.assert_allclose(q.astype(np.float32) @ kernel.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_dtrak_finds_a_query_that_is_a_training_item(tmp_path):
    """Known answer: with d > N and small damping, kernel regression of an item's own feature
    recovers that item, so a query equal to training item j ranks j first."""
    cfg, unet, alphas = _tiny(tmp_path)
    dt = DTRAK(unet, alphas, BaselinesConfig(dtrak_timesteps=[300], dtrak_proj_dim=64,
                                                dtrak_damping=1e-6))
    z, cond = _batch(12, cfg)
    phi = dt.featurize_all(z, cond)
    dt.fit(phi)
    for j in (0, 5, 11):  # same input and the same (item, t) noise as training item j
        q = dt.featurize(z[j : j + 1], cond[j : j + 1], torch.tensor([j]), tag=0)
        assert int(dt.scores(q).argmax()) == j


def test_projector_is_a_function_of_the_seed():
    shapes = {"a": torch.Size([4, 3]), "b": torch.Size([5])}
    g = {"a": torch.randn(2, 4, 3), "b": torch.randn(2, 5)}
    torch.testing.assert_close(Projector(shapes, 8, 0)(g), Projector(shapes, 8, 0)(g))
    assert not torch.allclose(Projector(shapes, 8, 0)(g), Projector(shapes, 8, 1)(g))


def test_baselines_stage_on_smoke_run(smoke_run):
    """Every method in the same harness: mAP vs the teacher, known answers, q/s, storage; and
    the report's methods table and trade-off figure include them."""
    from attribution.pipeline import Pipeline

    pipe = Pipeline(smoke_run.cfg, progress=False, echo=lambda s: None)
    pipe.run()
    res = json.loads((pipe.dir("baselines") / "baselines.json").read_text())
    assert set(res) == set(pipe.cfg.features.spaces) | {"dtrak"}
    for method, r in res.items():
        for k in pipe.cfg.student.k_eval:
            assert 0 <= r[f"mAP@{k}"] <= 1, method
        assert r["queries_per_second"] > 0 and r["storage_bytes"] > 0
    metrics = json.loads((pipe.root / "metrics.json").read_text())
    assert metrics["baseline.dtrak.mAP@5"] == pytest.approx(res["dtrak"]["mAP@5"])
    report = (pipe.root / "report.md").read_text()
    assert "| D-TRAK |" in report and "## Methods on the same test queries" in report


def test_counterfactual_leave_k_out_on_smoke(smoke_run):
    """Removing nothing reproduces the generator (ΔLoss 0, same image); removing the teacher's
    top-3 retrains without exactly those items."""
    from attribution.counterfactual.results import format_counterfactual
    from attribution.pipeline import Pipeline

    pipe = Pipeline(smoke_run.cfg, progress=False, echo=lambda s: None)
    out = pipe.run_counterfactual(["teacher"], [0], 0, progress=False, echo=lambda s: None)
    none = json.loads((out / "counterfactual_k0.json").read_text())  # each k its own file
    assert abs(none["rows"][0]["delta_loss"]) < 1e-5
    assert none["rows"][0]["image_distance"] < 1e-8
    out = pipe.run_counterfactual(["teacher", "random"], [0, 1], 3, progress=False,
                             echo=lambda s: None)
    res = json.loads((out / "counterfactual_k3.json").read_text())
    with np.load(pipe.dir("teacher") / "teacher_test.npz") as merged:
        top = merged["rank"][0, :3]
    row = next(r for r in res["rows"] if r["method"] == "teacher" and r["query"] == 0)
    assert row["removed"] == top.tolist()
    # smoke test query 0 prompts the planted cross: its known sources are the cross items
    from attribution.data.dataset import CaptionedImageSet

    cross = {i for i, a in enumerate(CaptionedImageSet(pipe.dir("world")).attributes)
             if a["shape"] == "cross"}
    assert row["known_sources"] == len(cross) == 4
    assert row["known_removed"] == len(cross & set(top.tolist()))
    assert row["known"] == {"shape=cross": [row["known_removed"], 4]}
    assert res["methods"]["teacher"]["known_answers"]["queries"] == 2
    gens = [json.loads(p.read_text())
            for p in pipe.retrained_dir().glob("*/generator.json")]
    assert sorted(top.tolist()) in [g["excluded"] for g in gens]
    # another student (so another counterfactual folder) on the same generator retrains nothing
    other = Pipeline(smoke_config(smoke_run.cfg.output_root, "student.epochs=7"), progress=False)
    assert other.counterfactual_dir() != out and other.retrained_dir() == pipe.retrained_dir()
    said = []
    other.run_counterfactual(["teacher", "random"], [0], 3, progress=False, echo=said.append)
    again = json.loads((other.counterfactual_dir() / "counterfactual_k3.json").read_text())
    assert not [s for s in said if "retraining" in s]
    assert again["rows"] == [r for r in res["rows"] if r["query"] == 0]
    assert set(res["methods"]) == {"teacher", "random"}
    assert "teacher" in format_counterfactual(res)
    with pytest.raises(ValueError, match="unknown method"):
        pipe.run_counterfactual(["nope"], [0], 3, progress=False)
    # a shorter schedule compares against a reference retrained on that schedule
    out = pipe.run_counterfactual(["random"], [0], 0, progress=False, echo=lambda s: None,
                             steps=10)
    short = json.loads((out / "counterfactual_s10_k0.json").read_text())
    assert short["steps"] == 10 and abs(short["rows"][0]["delta_loss"]) < 1e-5
    ref = json.loads((Path(short["reference"]) / "generator.json").read_text())
    assert ref["steps"] == 10 and ref["excluded"] == []
    # the full schedule's result is still there beside it (each schedule its own file)
    assert json.loads((out / "counterfactual_k3.json").read_text()) == res


def test_abu_diagonal_baseline_runs_a_second_teacher(smoke_run):
    """baselines.abu_diagonal=true scores the same test queries with a diagonal-Fisher teacher,
    cached like any stage; its rankings differ from AbU+'s but are evaluated the same way."""
    from attribution.pipeline import Pipeline
    from tests.conftest import smoke_config

    pipe = Pipeline(smoke_config(smoke_run.cfg.output_root, "baselines.abu_diagonal=true",
                                 "baselines.dtrak=false"), progress=False, echo=lambda s: None)
    pipe.run(["baselines"])
    res = json.loads((pipe.dir("baselines") / "baselines.json").read_text())
    assert "abu_diagonal" in res and "dtrak" not in res
    assert 0 <= res["abu_diagonal"]["mAP@5"] <= 1 and res["abu_diagonal"]["queries_per_second"] > 0
    diag = np.load(pipe.dir("baselines") / "rank_abu_diagonal.npy")
    with np.load(pipe.dir("teacher") / "teacher_test.npz") as merged:
        plus = merged["rank"]
    assert diag.shape == plus.shape and not np.array_equal(diag, plus)
    fishers = [json.loads(p.read_text()) for p in pipe.root.glob("fisher-*/fisher.json")]
    assert {"diagonal", "ekfac"} <= {f.get("kind") for f in fishers}


def test_counterfactual_summary_pairs_each_method_with_random_on_the_same_queries():
    from attribution.counterfactual.results import format_counterfactual, summarize

    rows = [{"method": m, "query": q, "delta_loss": d, "image_distance": 0.0}
            for m, q, d in [("teacher", 0, 0.5), ("teacher", 1, 0.2), ("random", 0, 0.4),
                            ("random", 1, -0.1), ("dtrak", 0, 0.1)]]
    s = summarize(rows, ["teacher", "random", "dtrak"])
    # teacher - random per query: 0.1, 0.3 -> mean 0.2, s.e. std([0.1, 0.3], ddof=1)/sqrt(2) = 0.1
    assert s["teacher"]["vs_random"] == pytest.approx(0.2)
    assert s["teacher"]["vs_random_stderr"] == pytest.approx(0.1)
    assert s["teacher"]["wins_vs_random"] == 2 and s["teacher"]["queries"] == 2
    assert s["dtrak"]["vs_random"] == pytest.approx(-0.3) and s["dtrak"]["wins_vs_random"] == 0
    assert "vs_random" not in s["random"]
    # against the teacher, paired: random - teacher = -0.1, -0.3 -> mean -0.2, s.e. 0.1: exactly
    # 2 s.e., so not separated; the teacher is not compared with itself
    assert s["random"]["vs_teacher"] == pytest.approx(-0.2)
    assert s["random"]["vs_teacher_stderr"] == pytest.approx(0.1)
    assert s["random"]["separated_from_teacher"] is False
    assert s["dtrak"]["vs_teacher"] == pytest.approx(-0.4) and "vs_teacher" not in s["teacher"]
    assert s["teacher"]["separated_from_random"] is False  # 0.2 is not beyond 2 x 0.1
    assert s["dtrak"]["separated_from_teacher"] is False  # one query: never judged apart
    text = format_counterfactual({"k": 3, "queries": [0, 1], "queries_asked": [0, 1, 2],
                                  "steps": 5, "methods": s})
    assert "of 3 asked" in text and "2/2" in text


def test_counterfactual_known_answers_count_the_planted_sources_each_removal_held():
    """Queries that prompt a planted concept: how many of its items (known sources) the removed
    top-k held, ΔLoss where it held all and where it did not, and the paired difference from
    random on those queries apart from the ordinary ones — worked by hand."""
    from attribution.counterfactual.results import format_counterfactual, summarize
    from attribution.teacher.evaluate import known_sources

    items = [{"shape": "cross"}, {"shape": "cross"}, {"shape": "disc"}, {"colour": "pink"}]
    queries = [{"shape": "cross"}, {"shape": "cross", "colour": "pink"}, {"shape": "disc"}]
    planted = [{"attribute": "shape", "value": "cross"}, {"attribute": "colour", "value": "pink"}]
    assert known_sources(items, queries, planted) == [
        {"shape=cross": {0, 1}}, {"shape=cross": {0, 1}, "colour=pink": {3}}, {}]
    # teacher: q0 removes both cross items (ΔL 0.9), q1 both cross but not the pink one (0.3),
    # q2 is ordinary
    rows = [{"method": "teacher", "query": 0, "delta_loss": 0.9, "known_sources": 2,
             "known_removed": 2, "known": {"shape=cross": [2, 2]}},
            {"method": "teacher", "query": 1, "delta_loss": 0.3, "known_sources": 3,
             "known_removed": 2, "known": {"shape=cross": [2, 2], "colour=pink": [0, 1]}},
            {"method": "teacher", "query": 2, "delta_loss": 0.05},
            {"method": "random", "query": 0, "delta_loss": 0.1, "known_sources": 2,
             "known_removed": 0, "known": {"shape=cross": [0, 2]}},
            {"method": "random", "query": 1, "delta_loss": -0.1, "known_sources": 3,
             "known_removed": 1, "known": {"shape=cross": [1, 2], "colour=pink": [0, 1]}},
            {"method": "random", "query": 2, "delta_loss": 0.0}]
    for r in rows:
        r["image_distance"] = 0.0
    s = summarize(rows, ["teacher", "random"])
    k = s["teacher"]["known_answers"]
    assert k["queries"] == 2 and k["every_source_removed"] == 1
    assert k["sources_removed"] == pytest.approx((1 + 2 / 3) / 2)
    assert k["delta_loss_every"] == pytest.approx(0.9)
    assert k["delta_loss_some"] == pytest.approx(0.3)
    # paired on the two known-answer queries: 0.8, 0.4 -> 0.6 ± 0.2; ordinary: 0.05 (one query)
    assert k["vs_random"] == pytest.approx(0.6) and k["vs_random_stderr"] == pytest.approx(0.2)
    assert k["wins_vs_random"] == 2
    assert k["ordinary_vs_random"] == pytest.approx(0.05) and k["ordinary_queries"] == 1
    cross, pink = k["by_concept"]["shape=cross"], k["by_concept"]["colour=pink"]
    assert cross["queries"] == 2 and cross["every_source_removed"] == 2
    assert cross["delta_loss_every"] == pytest.approx(0.6) and cross["delta_loss_some"] is None
    assert pink["queries"] == 1 and pink["delta_loss_some"] == pytest.approx(0.3)
    r = s["random"]["known_answers"]
    assert r["every_source_removed"] == 0 and r["delta_loss_every"] is None
    assert "vs_random" not in r
    text = format_counterfactual({"k": 2, "queries": [0, 1, 2], "steps": 5, "methods": s})
    assert "2 queries that prompt a planted concept" in text and "2/2" in text
