"""The teacher step-size study (attribution/studies/teacher_steps.py) on the smoke run."""

import json

import numpy as np
import pytest
import torch

from attribution.config import derive
from attribution.pipeline import Pipeline
from attribution.studies.scoring import score_at, score_path, score_steps
from attribution.studies.steps_table import format_steps
from attribution.teacher.run import teacher_scorer
from tests.conftest import run_cli
from tests.studies.helpers import step_study

FACTORS = [0.01, 1.0, 100.0]


def ascent(pipe: Pipeline) -> Pipeline:
    """The same run with the exact-ascent teacher (the smoke config's is the quadratic)."""
    return Pipeline(derive(pipe.cfg, {"teacher": {"estimator": "ascent"}}), progress=False)


@pytest.fixture(scope="module")
def study(smoke_run):
    summary = step_study(smoke_run, FACTORS, progress=False)
    return smoke_run, summary


def test_factor_one_reproduces_the_teacher_and_steps_grow(study):
    """Known answers: factor 1 is the configured teacher (same gradient draws, same item noise),
    so its full-set ranking is the teacher's exactly; a 100x larger step raises the query's own
    loss more than a 100x smaller one."""
    pipe, s = study
    assert s["factor_1_reproduces_teacher"] is True
    rows = {r["factor"]: r for r in s["rows"]}
    assert rows[1.0]["vs_teacher.mAP@10"] == pytest.approx(1.0)
    assert rows[0.01]["query_loss_rise"] < rows[1.0]["query_loss_rise"] < \
        rows[100.0]["query_loss_rise"]
    assert 0 <= rows[0.01]["share_items_rising"] <= 1
    assert "vs_next.mAP@10" in rows[0.01] and "vs_next.mAP@10" not in rows[100.0]
    assert rows[0.01]["next_factor"] == 1.0
    # agreement on planted-concept and on ordinary queries apart recombines into the whole
    kinds = s["query_kinds"]
    assert kinds["planted"] > 0 and kinds["ordinary"] > 0
    assert sum(n * rows[0.01][f"vs_next.{kind}.mAP@10"] for kind, n in kinds.items()) / sum(
        kinds.values()) == pytest.approx(rows[0.01]["vs_next.mAP@10"])
    assert "(planted)" in format_steps(s)
    planted = [k for k in rows[1.0] if k.endswith(" recall@10")]
    assert planted, "the smoke world plants concepts: their recall is part of the study"
    assert "factor" in format_steps(s)


def test_several_steps_from_one_gradient_equal_separate_scores(study):
    """score_at shares the query gradient across step sizes; each result equals a separate
    score() at that step (theta0 restored in between): exactly for the ascent; for the
    quadratic model exactly at the configured step, elsewhere to the error of its J·d
    difference, whose step scales with the configured η (a 10x smaller one sinks into float32
    rounding: 13 % on the smoke world at 0.1η with the forward difference)."""
    pipe, _ = study
    eta = pipe.cfg.teacher.eta
    for estimator in ("ascent", "quadratic"):
        cfg = derive(pipe.cfg, {"teacher": {"estimator": estimator}})
        scorer, _, queries = teacher_scorer(cfg, pipe.dirs(), "test")
        q = queries[0]
        factors = (0.1, 1, 10)
        several = score_at(scorer, q, [eta * f for f in factors])
        for r, f in zip(several, factors):
            scorer.tc = derive(cfg, {"teacher": {"eta": eta * f}}).teacher
            one = scorer.score(q)
            assert r["query_loss_after"] == pytest.approx(one["query_loss_after"])
            if estimator == "ascent" or f == 1:
                torch.testing.assert_close(r["influence"], one["influence"])
            elif f > 1:  # the model differences J·d at a step ∝ the CONFIGURED η: a teacher
                # configured with 10η takes it 10x larger, equal to the difference's error
                err = (r["influence"] - one["influence"]).norm() / one["influence"].norm()
                assert 0 < err < 0.03, err


def test_study_resumes_per_query_and_the_cli_draws_it(study, capsys):
    """A deleted query file is recomputed alone and gives the same summary; the command prints
    the table and writes the figure; the report shows the section."""
    pipe, s = study
    out = pipe.step_study_dir()
    victim = out / "f100" / "test_0.npy"
    before = np.load(victim)
    victim.unlink()
    code, text, err = run_cli(capsys, "study", "teacher-steps", "configs/experiment/toy_smoke.yaml",
                              f"output_root={pipe.cfg.output_root}", "--factors",
                              *map(str, FACTORS), "--no-progress")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(victim), before)
    again = json.loads((out / "steps.json").read_text())
    assert again == s
    assert "teacher step study" in text and (out / "steps.png").is_file()
    pipe.run(["student"])  # writes metrics.json and the report
    report = (pipe.root / "report.md").read_text()
    assert "## Teacher step size" in report and f"]({out.name}/steps.png)" in report
    assert "teacher step study" in report  # the study's table, from its fragment


def test_counterfactual_reads_the_study_as_teacher_at_a_factor(study):
    """``teacher@1`` in the counterfactual is the configured teacher's ranking exactly; a factor
    the study did not score is refused with the command that scores it."""
    from attribution.config import ConfigError
    from attribution.counterfactual.run import method_ranks

    pipe, _ = study
    dirs = {**pipe.dirs(), "steps": pipe.step_study_dir()}
    ranks = method_ranks(pipe.cfg, dirs, ["teacher", "teacher@1", "teacher@0.01"])
    np.testing.assert_array_equal(ranks["teacher@1"], ranks["teacher"])
    assert not np.array_equal(ranks["teacher@0.01"], ranks["teacher"])
    with pytest.raises(ConfigError, match="attribution study teacher-steps"):
        pipe.run_counterfactual(["teacher@0.5"], [0], 3, progress=False, echo=lambda s: None)


def test_a_damping_axis_preconditions_the_same_gradient_as_a_teacher_with_that_damping(study):
    """Known answer: ``with_damping`` at the configured damping is the same step, and a study
    setting at damping d equals a scorer BUILT with teacher.damping=d (the preconditioner is
    the only thing the damping changes)."""
    pipe, _ = study
    scorer, _, queries = teacher_scorer(ascent(pipe).cfg, pipe.dirs(), "test")
    q, eta = queries[0], pipe.cfg.teacher.eta
    same = scorer.precondition.with_damping(pipe.cfg.teacher.damping)
    low = scorer.precondition.with_damping(pipe.cfg.teacher.damping / 100)
    rows = score_steps(scorer, q, [eta * 0.1, eta * 0.1, eta * 0.1],
                              [scorer.precondition, same, low])
    torch.testing.assert_close(rows[0]["influence"], rows[1]["influence"])
    other = derive(pipe.cfg, {"teacher": {"damping": pipe.cfg.teacher.damping / 100}})
    built, _, _ = teacher_scorer(other, pipe.dirs(), "test")
    torch.testing.assert_close(rows[2]["influence"],
                               score_steps(built, q, [eta * 0.1])[0]["influence"])
    assert not torch.allclose(rows[0]["influence"], rows[2]["influence"])
    with pytest.raises(ValueError, match="preconditioners"):
        score_steps(scorer, q, [eta], [scorer.precondition, low])


def test_study_with_dampings_and_on_validation_concepts(study):
    """The damping axis adds rows at each damping (agreement only within one damping) and
    leaves the configured rows as they were; the val split scores the training queries that
    prompt a validation concept (heart) over every item, with that concept's known answers."""
    from attribution.config import val_concept_rows
    from attribution.counterfactual.run import method_ranks

    pipe, s = study
    d0 = pipe.cfg.teacher.damping
    both = step_study(pipe, FACTORS, progress=False, dampings=[d0 / 100])
    configured = [r for r in both["rows"] if r["damping"] == d0]
    assert configured == s["rows"]  # the configured files are reused, not rescored
    low = {r["factor"]: r for r in both["rows"] if r["damping"] == d0 / 100}
    assert sorted(low) == FACTORS and low[0.01]["next_factor"] == 1.0
    assert "vs_next.mAP@10" not in low[100.0]
    dirs = {**pipe.dirs(), "steps": pipe.step_study_dir()}
    ranks = method_ranks(pipe.cfg, dirs, ["teacher", f"teacher@1:{d0:g}", f"teacher@1:{d0 / 100:g}"])
    np.testing.assert_array_equal(ranks[f"teacher@1:{d0:g}"], ranks["teacher"])
    assert (ranks[f"teacher@1:{d0 / 100:g}"] >= 0).all()

    val = step_study(pipe, [1.0], n_queries=3, progress=False, split="val")
    held = val_concept_rows(pipe.cfg)
    assert held and set(held) <= set(val["rows_scored"]) and len(val["rows_scored"]) == 3
    (row,) = val["rows"]
    assert any(k.startswith("shape=heart") for k in row), row.keys()
    assert not any("cross" in k for k in row)  # the test concept is not a choosing answer
    assert (pipe.step_study_dir() / "steps_val.json").is_file()
    assert "training queries" in format_steps(val)


def test_counterfactual_on_the_choosing_split_reads_the_val_study(study, capsys):
    """The val split measures TRAINING queries: its teacher is the val study's factor 1, its
    removal is that ranking's top-k, its ΔLoss is measured on the training query's latent, and
    it lands in its own file; methods the split cannot rank, and queries the study did not
    score, are refused with what to run."""
    from attribution.config import ConfigError, val_concept_rows
    from attribution.counterfactual.results import result_files
    from attribution.counterfactual.run import method_ranks
    from attribution.counterfactual.study_files import load_row, query_file

    pipe, _ = study
    val = step_study(pipe, [1.0], n_queries=3, progress=False, split="val")
    rows = val["rows_scored"]
    dirs = {**pipe.dirs(), "steps": pipe.step_study_dir()}
    ranks = method_ranks(pipe.cfg, dirs, ["teacher", "random"], split="val")
    n = ranks["teacher"].shape[1]
    for q in range(ranks["teacher"].shape[0]):
        if q in rows:
            infl, _ = load_row(query_file(pipe.step_study_dir(), 1.0, q, split="val"), n)
            np.testing.assert_array_equal(ranks["teacher"][q], np.argsort(-infl, kind="stable"))
        else:
            assert (ranks["teacher"][q] == -1).all()
    test_random = method_ranks(pipe.cfg, dirs, ["random"])["random"]
    assert not np.array_equal(ranks["random"][0], test_random[0])  # its own stream
    with pytest.raises(ConfigError, match="val split"):
        method_ranks(pipe.cfg, dirs, ["student"], split="val")
    unscored = next(i for i in range(ranks["teacher"].shape[0]) if i not in rows)
    with pytest.raises(ConfigError, match="--split val"):
        pipe.run_counterfactual(["teacher"], [unscored], 2, progress=False, echo=lambda s: None,
                                split="val")
    q = val_concept_rows(pipe.cfg)[0]
    out = pipe.run_counterfactual(["teacher"], [q], 2, progress=False, echo=lambda s: None,
                                  split="val")
    res = json.loads((out / "counterfactual_val_k2.json").read_text())  # k = 2: its own file
    assert res["split"] == "val" and res["queries"] == [q]
    assert res["rows"][0]["removed"] == ranks["teacher"][q, :2].tolist()
    assert abs(res["rows"][0]["delta_loss"]) > 0  # two items removed: the query's loss moves
    assert "counterfactual_val_k2.json" in [p.name for p in result_files(out)]
    code, text, err = run_cli(capsys, "counterfactual", "configs/experiment/toy_smoke.yaml",
                              f"output_root={pipe.cfg.output_root}", "--split", "val",
                              "--methods", "teacher", "-k", "2", "--queries", str(q),
                              "--no-progress")  # the same removal: cached, nothing retrained
    assert code == 0, err
    assert "1 training queries (the choosing split)" in text
    assert (out / "counterfactual_val_k2.png").is_file()
    metrics = pipe.root / "metrics.json"
    hidden = metrics.rename(metrics.with_suffix(".hidden"))  # a counterfactual before the report
    try:
        code, text2, err = run_cli(capsys, "counterfactual", "configs/experiment/toy_smoke.yaml",
                                   f"output_root={pipe.cfg.output_root}", "--split", "val",
                                   "--methods", "teacher", "-k", "2", "--queries", str(q),
                                   "--no-progress")
    finally:
        hidden.rename(metrics)
    assert code == 0, err
    assert "figure: not drawn" in text2 and "1 training queries" in text2


def test_an_unlearning_path_is_first_order_equal_to_one_step_and_restores_theta(study):
    """Known answers for ``score_path``: the path and the one step are the same first-order
    update, so they differ at second order — little at a small step (≤ 5 % of the influences
    here) and far less than at a 10× larger one; the path takes the gradients its schedule
    says (from η_min/10, ``per_decade`` per factor of 10, landing on each η); θ0 is restored,
    so the teacher's own score is reproduced afterwards; at a large step recomputing the
    gradient changes the result."""
    pipe, _ = study
    scorer, _, queries = teacher_scorer(ascent(pipe).cfg, pipe.dirs(), "test")
    q, eta = queries[0], pipe.cfg.teacher.eta
    before = scorer.score(q)["influence"]

    def gap(factor):
        (one,) = score_steps(scorer, q, [eta * factor])
        (walk,) = score_path(scorer, q, [eta * factor], per_decade=4)
        assert walk["path_steps"] == 5  # η/10 and 3 points between, then η itself
        return float((walk["influence"] - one["influence"]).abs().max()
                     / one["influence"].abs().max())

    small, larger = gap(1e-3), gap(1e-2)
    assert small <= 0.05 and small < larger / 3, (small, larger)
    small, big = score_path(scorer, q, [eta, eta * 0.01], per_decade=2)  # any order in
    assert (small["path_steps"], big["path_steps"]) == (3, 7)  # 1e-3 .. 1e-2, then .. 1
    assert big["query_loss_after"] > small["query_loss_after"] > small["query_loss_before"]
    (jump,) = score_steps(scorer, q, [eta])
    assert not torch.allclose(big["influence"], jump["influence"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(scorer.score(q)["influence"], before)
    with pytest.raises(ValueError, match="at least 1 step"):
        score_path(scorer, q, [eta], per_decade=0)


def test_path_study_lives_beside_the_one_step_study_and_compares_with_it(study, capsys):
    """``--path M``: files and summary in ``path<M>/``; each row says how far the path's
    ranking agrees with the one-step teacher at the same factor; the CLI prints it.  (A path
    walks the exact ascent: the study of an ascent teacher.)"""
    pipe = ascent(study[0])
    one = step_study(pipe, [0.01, 1.0], n_queries=2, progress=False)
    s = step_study(pipe, [0.01, 1.0], n_queries=2, progress=False, path=2)
    folder = pipe.step_study_dir() / "path2"
    assert (folder / "steps.json").is_file() and (folder / "f1" / "test_0.npy").is_file()
    assert s["path"] == 2 and not s["factor_1_reproduces_teacher"]
    for r in s["rows"]:
        assert 0 <= r["vs_one_step.mAP@10"] <= 1
    # on val, "vs teacher" is the ONE-step configured teacher (its factor-1 files), not the
    # path's own factor 1
    step_study(pipe, [1.0], n_queries=3, progress=False, split="val")
    val = step_study(pipe, [1.0], n_queries=3, progress=False, split="val", path=2)
    (row,) = val["rows"]
    assert row["vs_teacher.mAP@10"] == row["vs_one_step.mAP@10"] < 1
    meta = json.loads((folder / "f1" / "test_0.json").read_text())
    assert meta["path_steps"] == 7
    assert "along an unlearning path (2 steps per decade)" in format_steps(s)
    assert one["path"] == 0 and not (pipe.step_study_dir() / "f1" / "test_0.json").read_text() \
        .count("path_steps")
    code, text, err = run_cli(capsys, "study", "teacher-steps", "configs/experiment/toy_smoke.yaml",
                              f"output_root={pipe.cfg.output_root}",
                              "teacher.estimator=ascent", "--factors", "0.01", "1",
                              "--queries", "2", "--path", "2", "--no-progress")
    assert code == 0, err
    assert "vs 1-step" in text and (folder / "steps.png").is_file()
    pipe.run(["student"])  # the report shows the path study beside the one-step one
    report = (pipe.root / "report.md").read_text()
    assert f"]({pipe.step_study_dir().name}/path2/steps.png)" in report
    assert report.index("/steps.png)") < report.index("/path2/steps.png)")  # one step first


def test_the_even_part_of_the_loss_change_is_second_order_and_free_of_the_gradient_term(study):
    """Known answers for ``--even``: ½[ΔL(+η) + ΔL(−η)] cancels the first-order term, so
    doubling a step that is still near-quadratic (factors 0.05 → 0.1 here) multiplies the even
    part by ≈ 4 while the odd part ½[ΔL(+η) − ΔL(−η)] (the first-order term) only doubles;
    the study writes the descents beside the one-step study's ascents, reuses those, and ranks
    by exactly the even part of the two files."""
    from attribution.callbacks import map_at_ks
    from attribution.counterfactual.study_files import load_row, query_file

    pipe, _ = study
    scorer, _, queries = teacher_scorer(pipe.cfg, pipe.dirs(), "test")
    q, eta = queries[0], pipe.cfg.teacher.eta
    with torch.no_grad():
        r = [x["influence"] for x in score_steps(scorer, q, [eta * f for f in
                                                            (0.05, -0.05, 0.1, -0.1)])]
    even = [float((0.5 * (a + b)).abs().mean()) for a, b in (r[:2], r[2:])]
    odd = [float((0.5 * (a - b)).abs().mean()) for a, b in (r[:2], r[2:])]
    assert 3.0 < even[1] / even[0] < 5.0, even
    assert 1.8 < odd[1] / odd[0] < 2.2, odd

    ascent = query_file(pipe.step_study_dir(), 1.0, 0)
    stamp = ascent.stat().st_mtime_ns
    s = step_study(pipe, [1.0, 100.0], n_queries=2, progress=False, even=True)
    assert ascent.stat().st_mtime_ns == stamp  # the one-step study's ascent, not rescored
    n = r[0].numel()
    up, down = ([load_row(query_file(pipe.step_study_dir(), f, qid), n)[0] for qid in (0, 1)]
                for f in (1.0, -1.0))
    # the summary ranks by ½(ascent + descent): its agreement with the stored teacher is that
    # ranking's, recomputed here from the two files
    with np.load(pipe.dir("teacher") / "teacher_test.npz") as merged:
        teacher = merged["rank"][:2]
    mine = np.argsort(-(np.stack(up) + np.stack(down)), axis=1, kind="stable")
    assert s["rows"][0]["vs_teacher.mAP@10"] == pytest.approx(
        map_at_ks(mine, teacher, [10])["mAP@10"])
    assert s["even"] is True and not s["factor_1_reproduces_teacher"]
    assert [r["factor"] for r in s["rows"]] == [1.0, 100.0]
    # against the one step of the same size: at factor 1 that is the stored teacher itself
    one = s["rows"][0]
    assert one["vs_one_step.mAP@10"] == pytest.approx(one["vs_teacher.mAP@10"])
    assert one["vs_one_step.mAP@10"] < 1  # the even part ranks otherwise than the ascent
    val = step_study(pipe, [1.0], n_queries=3, progress=False, split="val", even=True)
    (row,) = val["rows"]  # val: "vs teacher" is the one-step factor 1, not the even part's
    assert row["vs_teacher.mAP@10"] == row["vs_one_step.mAP@10"] < 1
    assert (pipe.step_study_dir() / "steps_val_even.json").is_file()
    assert (pipe.step_study_dir() / "steps_even.json").is_file()
    assert "EVEN part" in format_steps(s)
    # the counterfactual reads the same ranking as teacher-even@<factor>
    from attribution.config import ConfigError
    from attribution.counterfactual.run import method_ranks

    dirs = {**pipe.dirs(), "steps": pipe.step_study_dir()}
    ranks = method_ranks(pipe.cfg, dirs, ["teacher-even@1", "teacher@1"])
    np.testing.assert_array_equal(ranks["teacher-even@1"][:2], mine)
    assert (ranks["teacher-even@1"][2:] == -1).all()  # the study scored 2 queries
    with pytest.raises(ConfigError, match="--factors 0.01 --even"):
        pipe.run_counterfactual(["teacher-even@0.01"], [0], 3, progress=False,
                                echo=lambda s: None)
    with pytest.raises(ValueError, match="not of a path"):
        step_study(pipe, [1.0], n_queries=1, progress=False, even=True, path=2)

