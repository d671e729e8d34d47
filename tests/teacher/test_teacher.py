import json
import pickle

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from attribution.common.files import DataFileError
from attribution.generator.model import build_codec, build_scheduler, build_unet
from attribution.pipeline import Pipeline
from attribution.teacher import scorer as scorer_mod
from attribution.teacher.candidates import candidate_losses
from attribution.teacher.fisher import (
    FisherDraws,
    FisherMismatchError,
    diagonal_fisher,
    ekfac_factors,
    load_fisher,
    save_fisher,
)
from attribution.teacher.params import ParamSnapshot, select_modules, select_parameters
from attribution.teacher.run import build_scorer, make_queries, run_teacher
from attribution.teacher.unlearn import DiagonalPreconditioner, EKFACPreconditioner
from tests.conftest import smoke_config

TEACHER = ["generator.train.steps=150", "generator.train.steps_per_epoch=50",
           "world.planted=[{attribute: shape, value: cross, count: 6}]",
           "queries.planted_test=3", "queries.n_test=4", "queries.n_train=4"]


@pytest.fixture(scope="module")
def teacher_pipe(tmp_path_factory):
    """A small world with a planted 'cross' (6 items) and a generator trained 150 steps."""
    root = tmp_path_factory.mktemp("teacher_runs")
    pipe = Pipeline(smoke_config(root, *TEACHER), progress=False, echo=lambda s: None)
    pipe.run(["fisher", "queries"])
    return pipe


def _tiny_unet(cfg):
    torch.manual_seed(0)
    return build_unet(cfg.generator, build_codec(cfg.generator, 16)).eval()


def test_parameter_groups(tmp_path):
    unet = _tiny_unet(smoke_config(tmp_path))
    kv = select_modules(unet, "cross_attn_kv")
    assert kv and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in kv)
    assert set(select_parameters(unet, "cross_attn_kv")) == {f"{n}.weight" for n in kv}
    assert len(select_parameters(unet, "attn")) > len(select_parameters(unet, "cross_attn"))
    with pytest.raises(ValueError, match="unknown parameter group"):
        select_modules(unet, "kv")


def test_diagonal_fisher_matches_per_sample_loop(teacher_pipe):
    """torch.func grad+vmap per-sample gradients equal a plain autograd loop."""
    from attribution.generator.model import denoising_loss
    from attribution.teacher.run import load_world_model

    p = teacher_pipe
    unet, _, alphas, cands = load_world_model(p.cfg, p.dir("world"), p.dir("text"),
                                              p.dir("generator"))
    names = list(select_parameters(unet, "cross_attn_kv"))[:4]
    draws = FisherDraws(cands, len(alphas), epochs=1, seed=0, items=torch.arange(6))
    fast = diagonal_fisher(unet, names, alphas, draws, batch_size=4, progress=False)
    params = dict(unet.named_parameters())
    ref = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(draws)):
        z, cond, t, eps = draws[i]
        unet.zero_grad()
        for n in names:
            params[n].requires_grad_(True)
        denoising_loss(unet, alphas, z[None], cond[None], t[None], eps[None]).backward()
        for n in names:
            ref[n] += params[n].grad.pow(2) / len(draws)
    for n in names:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-3, atol=1e-12)


def test_bf16_ekfac_is_the_fp32_ekfac_to_bf16_resolution(teacher_pipe):
    """teacher.fisher_precision=bf16 runs the EK-FAC fit's passes under autocast: the factors
    move (autocast is on) but stay within a few bf16 steps of float32's (8 significant bits,
    ~0.4 % a product, summed over many draws)."""
    from attribution.teacher.run import load_world_model

    p = teacher_pipe
    unet, _, alphas, cands = load_world_model(p.cfg, p.dir("world"), p.dir("text"),
                                              p.dir("generator"))
    draws = FisherDraws(cands, len(alphas), epochs=1, seed=0, items=torch.arange(24))
    mods = list(select_modules(unet, "cross_attn_kv"))
    fit = {prec: ekfac_factors(unet, mods, alphas, draws, batch_size=8, progress=False,
                               precision=prec) for prec in ("fp32", "bf16")}
    lams = [k for k in fit["fp32"] if k.endswith("lambda_matrix")]
    assert lams
    for name in lams:
        ref = fit["fp32"][name]
        rel = ((fit["bf16"][name] - ref).norm() / ref.norm()).item()
        assert 0 < rel < 0.05, (name, rel)


def test_ekfac_preconditioner_equals_dense_formula():
    torch.manual_seed(0)
    dout, din = 3, 4
    qa = torch.linalg.qr(torch.randn(din + 1, din + 1))[0]
    qg = torch.linalg.qr(torch.randn(dout, dout))[0]
    lam = torch.rand(dout, din + 1) + 0.1
    factors = {"m.activation_eigenvectors": qa, "m.gradient_eigenvectors": qg,
               "m.lambda_matrix": lam * 5, "m.num_lambda_processed": torch.tensor(5.0)}
    gw, gb = torch.randn(dout, din), torch.randn(dout)
    out = EKFACPreconditioner(factors, gain=2.0, damping=0.1)({"m.weight": gw, "m.bias": gb})
    # dense: vec(G) in the Kronecker eigenbasis, divided by (sΛ + λ), rotated back
    g = torch.cat([gw, gb[:, None]], 1)
    basis = torch.kron(qg, qa)  # row-major vec: vec(Q_G X Q_Aᵀ) = (Q_G ⊗ Q_A) vec(X)
    scaled = 2.0 * lam
    denom = (scaled + 0.1 * scaled.mean()).reshape(-1)
    nat = (basis @ ((basis.T @ g.reshape(-1)) / denom)).reshape(dout, din + 1)
    torch.testing.assert_close(out["m.weight"], nat[:, :din])
    torch.testing.assert_close(out["m.bias"], nat[:, din])


def test_diagonal_preconditioner_known_values():
    f = {"w": torch.tensor([1.0, 3.0])}
    out = DiagonalPreconditioner(f, gain=2.0, damping=0.5)({"w": torch.tensor([2.0, 2.0])})
    lam = 0.5 * 4.0  # damping × mean(gain·F) = 0.5 × mean([2, 6])
    torch.testing.assert_close(out["w"], torch.tensor([2 / (2 + lam), 2 / (6 + lam)]))


def test_snapshot_restores_exactly(tmp_path):
    unet = _tiny_unet(smoke_config(tmp_path))
    params = select_parameters(unet, "cross_attn_kv")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    snap = ParamSnapshot(params)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    snap.restore()
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_known_answer_planted_concept(teacher_pipe):
    """Queries prompting the planted 'cross' must rank the 6 planted items far above chance."""
    res = teacher_pipe.run(["teacher"])["teacher"]
    known = json.loads((res.dir / "known_answers.json").read_text())["shape=cross"]
    assert known["queries"] == 3 and known["planted_items"] == 6
    assert known["mrr"] > 5 * known["chance_mrr"]
    assert known["recall@10"] > 5 * known["chance_recall@10"]
    # released layout
    test = pickle.loads((res.dir / "influence_test.pkl").read_bytes())["random"]
    assert test["influence"].shape == (4, 200) and test["rank"].shape == (4, 200)
    np.testing.assert_array_equal(test["rank"][0], np.argsort(-test["influence"][0],
                                                              kind="stable"))
    train = pickle.loads((res.dir / "influence_train.pkl").read_bytes())["random"]
    k = teacher_pipe.cfg.teacher.k
    assert set(train) == {"rank", "influence_subset", "rank_influence_subset"}
    assert train["rank"].shape == (4, k)
    cands = np.load(res.dir / "candidates_train.npy")
    np.testing.assert_array_equal(
        train["rank"], np.take_along_axis(cands, train["rank_influence_subset"], 1))
    assert res.summary["query_loss_increase"] > 0  # the step is an ascent on the query loss


def test_rankings_do_not_depend_on_batch_size(teacher_pipe, tmp_path):
    p = teacher_pipe
    results = []
    for bs in (7, 100):
        cfg = smoke_config(p.cfg.output_root, *TEACHER, f"teacher.batch_size={bs}",
                           f"teacher.query_batch_size={bs}")
        sc, cands = build_scorer(cfg, p.dir("world"), p.dir("text"), p.dir("generator"),
                                 p.dir("fisher"), tmp_path / f"bs{bs}")
        q = make_queries(cfg, p.dir("queries"), cands, tmp_path / f"bs{bs}")[-1]
        results.append(sc.score(q)["influence"].numpy())
    assert spearmanr(results[0], results[1]).statistic >= 0.999


def test_killed_run_resumes_to_the_same_result(teacher_pipe, tmp_path, monkeypatch):
    p = teacher_pipe
    args = (p.cfg, p.dir("world"), p.dir("text"), p.dir("generator"), p.dir("queries"),
            p.dir("fisher"))
    run_teacher(*args, tmp_path / "straight", progress=False)
    calls = {"n": 0}
    real = scorer_mod.AbUScorer.score

    def crashing(self, q):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(self, q)

    monkeypatch.setattr(scorer_mod.AbUScorer, "score", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        run_teacher(*args, tmp_path / "resumed", progress=False)
    shards = sorted((tmp_path / "resumed" / "shards").rglob("*.npz"))
    assert len(shards) == 3
    stamps = {s: s.stat().st_mtime_ns for s in shards}
    monkeypatch.setattr(scorer_mod.AbUScorer, "score", real)
    out = run_teacher(*args, tmp_path / "resumed", progress=False)
    assert out["queries_scored"] == 8 - 3
    assert all(s.stat().st_mtime_ns == t for s, t in stamps.items())  # finished work kept
    for split in ("train", "test"):
        a = np.load(tmp_path / "straight" / f"teacher_{split}.npz")
        b = np.load(tmp_path / "resumed" / f"teacher_{split}.npz")
        np.testing.assert_array_equal(a["rank"], b["rank"])
        np.testing.assert_allclose(a["influence"], b["influence"], rtol=0, atol=0)


def test_fisher_from_another_checkpoint_is_refused(teacher_pipe, tmp_path):
    fisher = {"w": torch.ones(2)}
    save_fisher(tmp_path, fisher, {"generator_sha256": "a" * 64, "kind": "diagonal",
                                   "params": "cross_attn_kv"})
    with pytest.raises(FisherMismatchError, match="recompute"):
        load_fisher(tmp_path, "b" * 64, "diagonal", "cross_attn_kv")
    with pytest.raises(FisherMismatchError, match="ekfac"):
        load_fisher(tmp_path, "a" * 64, "ekfac", "cross_attn_kv")
    with pytest.raises(DataFileError, match="missing"):
        load_fisher(tmp_path / "none", "a" * 64, "diagonal", "cross_attn_kv")


def test_empty_candidates_and_nan_losses(teacher_pipe, tmp_path):
    p = teacher_pipe
    sc, cands = build_scorer(p.cfg, p.dir("world"), p.dir("text"), p.dir("generator"),
                             p.dir("fisher"), tmp_path)
    q = make_queries(p.cfg, p.dir("queries"), cands, tmp_path)[0]
    q.candidates = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="empty candidate set"):
        sc.score(q)
    bad = torch.full_like(cands.latents[:2], float("nan"))
    cands.latents[:2] = bad
    with pytest.raises(FloatingPointError, match="non-finite"):
        candidate_losses(sc.unet, build_scheduler(p.cfg.generator).alphas_cumprod, cands,
                         torch.arange(4), [100], 1, False, 0)


def test_known_answer_diagonal_teacher(teacher_pipe):
    """AbU with the diagonal Fisher also finds the planted items far above chance."""
    pipe = Pipeline(smoke_config(teacher_pipe.cfg.output_root, *TEACHER, "teacher.fisher=diagonal"),
                    progress=False, echo=lambda s: None)
    assert pipe.dir("generator") == teacher_pipe.dir("generator")  # reuses the trained model
    res = pipe.run(["teacher"])["teacher"]
    known = json.loads((res.dir / "known_answers.json").read_text())["shape=cross"]
    assert known["mrr"] > 5 * known["chance_mrr"]


def test_known_answer_recall_and_its_standard_error_on_a_known_ranking():
    from attribution.teacher.evaluate import planted_known_answers

    items = [{"colour": "pink"}] * 2 + [{"colour": "red"}] * 18
    queries = [{"colour": "pink"}, {"colour": "pink"}, {"colour": "red"}]
    rank = np.tile(np.arange(20), (3, 1))
    rank[1] = rank[1][::-1]  # the second pink query puts both planted items last
    known = planted_known_answers(items, queries, rank, [{"attribute": "colour",
                                                          "value": "pink"}], k=10)["colour=pink"]
    assert known["queries"] == 2 and known["recall@10"] == 0.5
    assert known["recall@10_stderr"] == pytest.approx(0.5)  # std([1, 0], ddof=1) / sqrt(2)
