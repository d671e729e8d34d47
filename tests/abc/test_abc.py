"""The customization benchmark: customization, metrics, tuned features, soft attribution."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from attribution.abc import concepts as C
from attribution.abc.benchmark import chance_average_precision, evaluate_rankings
from attribution.abc.calibration import (
    Calibrator,
    calibration_report,
    fit_calibrator,
    negative_log_likelihood,
)
from attribution.abc.customize import (
    Customized,
    Prior,
    customize,
    load_delta,
    save_delta,
)
from attribution.abc.mapper import Mapper, train_mapper
from attribution.common.files import DataFileError
from attribution.config import AbcConfig
from attribution.generator.model import PixelCodec, build_scheduler, build_unet
from attribution.teacher.params import select_parameters
from tests.conftest import SMOKE, smoke_config


def _tiny_unet(tmp_path):
    cfg = smoke_config(tmp_path)
    torch.manual_seed(0)
    return build_unet(cfg.generator, PixelCodec(16)), build_scheduler(cfg.generator).alphas_cumprod


def _state(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_customization_changes_only_kv_and_restores_exactly(tmp_path):
    unet, alphas = _tiny_unet(tmp_path)
    before = _state(unet)
    z, cond = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 20, 384)
    prior = Prior(torch.randn(5, 3, 16, 16), torch.zeros(5, 2, dtype=torch.long),
                  lambda rows: torch.randn(*rows.shape, 20, 384, generator=torch.Generator()))
    delta = customize(unet, alphas, z, cond, AbcConfig(steps=3, batch_size=2,
                                                               prior_batch_size=2), 0, prior)
    kv = select_parameters(unet, "cross_attn_kv")
    assert set(delta) == set(kv) and all(d.abs().sum() > 0 for d in delta.values())
    after = _state(unet)
    assert all(torch.equal(before[k], after[k]) for k in before)  # θ0 untouched
    with Customized(unet, delta):
        inside = _state(unet)
        for k in before:
            if k in delta:
                assert torch.allclose(inside[k], before[k] + delta[k])
            else:
                assert torch.equal(inside[k], before[k]), k  # only K/V moved
    assert all(torch.equal(before[k], v) for k, v in _state(unet).items())
    # the same inputs give the same delta (draws keyed by seed, concept and step)
    again = customize(unet, alphas, z, cond, AbcConfig(steps=3, batch_size=2), 0)
    once = customize(unet, alphas, z, cond, AbcConfig(steps=3, batch_size=2), 0)
    assert all(torch.equal(again[k], once[k]) for k in again)


def test_delta_file_round_trip_and_corruption(tmp_path):
    unet, _ = _tiny_unet(tmp_path)
    delta = {k: torch.randn_like(p) * 1e-2 for k, p in select_parameters(unet, "cross_attn_kv").items()}
    save_delta(tmp_path / "d.safetensors", delta, {"concept": "zorvik"})
    back = load_delta(tmp_path / "d.safetensors")
    assert all(torch.allclose(back[k], delta[k], rtol=1e-3, atol=1e-6) for k in delta)  # f16
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(DataFileError, match="bad.safetensors"):
        load_delta(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="shapes"):
        Customized(unet, {k: torch.zeros(3) for k in delta})


def test_concepts_are_new_and_deterministic():
    a, b = C.make_concepts(6, 3, 0), C.make_concepts(6, 3, 0)
    assert [c.word for c in a] == [c.word for c in b] and len({c.word for c in a}) == 6
    assert [c.kind for c in a] == ["object", "style"] * 3
    for c in a:
        p = C.prompt(c.exemplars[0])
        assert c.word in p and "  " not in p
        img = C.render(c, c.exemplars[0], 16)
        assert img.shape == (16, 16, 3) and np.array_equal(img, C.render(c, c.exemplars[0], 16))
    style = a[1]
    assert all(C.captions(lay, [2])[0].count(style.word) == 1 for lay in style.exemplars)


def test_benchmark_metrics_equal_hand_computed_values():
    rankings = np.array([[3, 0, 5, 1, 2, 4], [1, 2, 0, 3, 4, 5], [4, 5, 3, 2, 1, 0]])
    positives = np.zeros((3, 6), bool)
    positives[0, [0, 5]] = True  # found at positions 2 and 3
    positives[1, [1]] = True  # found first
    positives[2, [0, 2]] = True  # found at positions 4 and 6
    kinds = np.array(["object", "style", "object"])
    out = evaluate_rankings(rankings, positives, kinds, [1, 2, 3])
    ap = [(1 / 2 + 2 / 3) / 2, 1.0, (1 / 4 + 2 / 6) / 2]
    assert out["all"]["mAP"] == pytest.approx(np.mean(ap))
    assert out["object"]["mAP"] == pytest.approx((ap[0] + ap[2]) / 2)
    assert out["style"]["mAP"] == pytest.approx(1.0) and out["style"]["queries"] == 1
    assert out["object"]["recall@1"] == 0 and out["object"]["recall@2"] == pytest.approx(0.25)
    assert out["object"]["recall@3"] == pytest.approx(0.5) and out["style"]["recall@1"] == 1
    assert out["object"]["mAP_stderr"] == pytest.approx(np.std([ap[0], ap[2]], ddof=1) / 2 ** 0.5)


def test_chance_average_precision_by_enumeration():
    from attribution.metrics import average_precision

    for pool, n in ((5, 1), (5, 2), (6, 3)):
        aps = [average_precision(perm, range(n)) for perm in itertools.permutations(range(pool))]
        assert chance_average_precision(pool, n) == pytest.approx(np.mean(aps))


def test_calibrator_probabilities_sum_to_one_and_fit_improves_likelihood():
    rng = np.random.default_rng(0)
    q, p = 60, 40
    positives = np.zeros((q, p), bool)
    positives[np.arange(q), rng.integers(p, size=q)] = True
    # scores: the true item is often, not always, on top; a big gap when it is not
    scores = rng.normal(0, 0.05, (q, p)) + 0.15 * positives
    scores[np.arange(0, q, 3), rng.integers(p, size=len(range(0, q, 3)))] += 0.5
    for cal in (Calibrator(0.1), Calibrator(0.05, -2.0), Calibrator(3.0, 1.0)):
        probs = cal.probabilities(scores)
        assert np.allclose(probs.sum(1), 1) and (probs >= 0).all()
    fitted = fit_calibrator(scores, positives)
    plain = fit_calibrator(scores, positives, offset=False)
    nll = negative_log_likelihood(fitted, scores, positives)
    for tau in (1.0, 0.1, 0.01):
        assert nll < negative_log_likelihood(Calibrator(tau), scores, positives)
    assert nll <= negative_log_likelihood(plain, scores, positives) + 1e-9
    assert math.isfinite(fitted.offset) and math.isinf(plain.offset)
    rep = calibration_report(fitted, scores, positives)
    assert rep["nll"] == pytest.approx(nll) and 0 < rep["exemplar_mass"] < 1
    assert 0 <= rep["ece@10"] <= 1


def test_mapper_starts_as_identity_and_learns_what_matters():
    x = torch.randn(7, 12)
    for kind in ("linear", "mlp"):
        assert torch.allclose(Mapper(12, kind)(x), torch.nn.functional.normalize(x, dim=-1),
                              atol=1e-6)
    # features = weak concept code (8 dims) + strong nuisance (8 dims); a query shares its
    # concept's code with the exemplars but copies a random distractor's nuisance
    g = torch.Generator().manual_seed(0)

    def world(n_concepts, n_distractors=200):
        codes = torch.randn(n_concepts, 8, generator=g)
        distract = torch.cat([torch.randn(n_distractors, 8, generator=g) * 0.3,
                              torch.randn(n_distractors, 8, generator=g)], 1)
        ex = torch.cat([codes.repeat_interleave(2, 0) * 0.3,
                        torch.randn(2 * n_concepts, 8, generator=g)], 1)
        pick = torch.randint(n_distractors, (3 * n_concepts,), generator=g)
        qs = torch.cat([codes.repeat_interleave(3, 0) * 0.3, distract[pick, 8:]], 1)
        pool = torch.cat([distract, ex])
        owner = torch.cat([torch.full((n_distractors,), -1), torch.arange(n_concepts).repeat_interleave(2)])
        pos = torch.arange(n_concepts).repeat_interleave(3)[:, None] == owner[None, :]
        return qs, pool, pos

    def m_ap(q, pool, pos):
        s = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(pool, dim=-1).T
        r = np.argsort(-s.numpy(), axis=1)
        return evaluate_rankings(r, pos.numpy(), np.array(["o"] * len(q)), [1])["all"]["mAP"]

    tq, tp, tpos = world(30)
    mapper, fit = train_mapper(tq, tp, tpos, steps=200, lr=1e-2, seed=0)
    assert fit["loss_end"] < fit["loss_start"]
    hq, hp, hpos = world(10)  # held-out concepts
    with torch.no_grad():
        tuned = m_ap(mapper(hq), mapper(hp), hpos)
    assert tuned > m_ap(hq, hp, hpos) + 0.3


@pytest.fixture(scope="module")
def abc_run(smoke_run):
    smoke_run.run(["abc"])
    return smoke_run


def test_abc_stage_on_smoke_run(abc_run):
    out = abc_run.dir("abc")
    s = json.loads((out / "abc.json").read_text())
    spaces = list(abc_run.cfg.features.spaces)
    expected = {*spaces, *(f"{sp} tuned" for sp in spaces), "student", "teacher"}
    assert set(s["methods"]) == expected
    for res in s["methods"].values():
        assert {"all", "object", "style"} <= set(res)
        assert all(0 <= r["mAP"] <= 1 for r in res.values())
    a = abc_run.cfg.abc
    assert s["test_queries"] == a.n_test * a.images
    assert s["methods"]["teacher"]["all"]["queries"] == a.n_test * a.teacher_images
    assert s["pool"] == abc_run.cfg.world.n_items + (a.n_train + a.n_test) * a.exemplars
    assert s["chance"]["recall@10"] == pytest.approx(10 / s["pool"])
    cal = json.loads((out / "calibration.json").read_text())
    assert set(cal) == set(s["methods"]) - {"teacher"}
    # the report draws the figure from abc.json (the stage itself writes data only)
    assert (abc_run.root / "figures" / "abc.png").is_file()
    assert (abc_run.dir("customize") / "grid_test.png").is_file()
    assert len(list((abc_run.dir("customize") / "models").glob("*.safetensors"))) == \
        a.n_train + a.n_test
    report = (abc_run.root / "report.md").read_text()
    assert "Customization benchmark" in report and "| teacher | all |" in report
    assert "](figures/abc.png)" in report


def test_customize_resumes_per_concept(abc_run, tmp_path):
    """A concept whose outputs are gone is redone alone, and gives the same images."""
    from attribution.abc.customize_stage import run_customize

    src = abc_run.dir("customize")
    import shutil

    dst = tmp_path / "customize"
    shutil.copytree(src, dst)
    (dst / "synth" / "001.npz").unlink()
    (dst / "models" / "001.safetensors").unlink()
    res = run_customize(abc_run.cfg, abc_run.inputs("customize"), dst, progress=False)
    assert res["customized_now"] == 1
    with np.load(src / "synth" / "001.npz") as a, np.load(dst / "synth" / "001.npz") as b:
        assert np.array_equal(a["images"], b["images"])


def test_attribute_prints_share_of_influence(abc_run, capsys):
    from attribution.cli import main

    q = abc_run.dir("queries") / "query_test"
    prompt = (q / "captions.txt").read_text().splitlines()[0]
    rc = main(["attribute", str(SMOKE), f"output_root={abc_run.cfg.output_root}",
               "--image", str(q / "images" / "0.png"), "--prompt", prompt, "-k", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "share" in out
    shares = [float(ln.split()[3]) for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(shares) == 4 and shares == sorted(shares, reverse=True) and sum(shares) <= 100


def test_bad_abc_config_keys_fail_clearly(tmp_path):
    from attribution.config import ConfigError

    with pytest.raises(ConfigError, match="abc.exemplars"):
        smoke_config(tmp_path, "abc.exemplars=0")
    with pytest.raises(ConfigError, match="features.spaces"):
        smoke_config(tmp_path, "abc.spaces=[dino]")
    with pytest.raises(ConfigError, match="abc.mapper"):
        smoke_config(tmp_path, "abc.mapper=deep")
