"""The teacher step-size study (attribution/teacher/steps.py) on the smoke run."""

import json

import numpy as np
import pytest
import torch

from attribution.config import derive
from attribution.teacher.run import teacher_scorer
from attribution.teacher.steps import format_steps
from tests.conftest import run_cli

FACTORS = [0.01, 1.0, 100.0]


@pytest.fixture(scope="module")
def study(smoke_run):
    summary = smoke_run.run_step_study(FACTORS, progress=False)
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
    planted = [k for k in rows[1.0] if k.endswith(" recall@10")]
    assert planted, "the smoke world plants concepts: their recall is part of the study"
    assert "factor" in format_steps(s)


def test_several_steps_from_one_gradient_equal_separate_scores(study):
    """score_steps shares the query gradient across step sizes; each result equals a separate
    score() at that step (theta0 restored in between)."""
    pipe, _ = study
    scorer, _, queries = teacher_scorer(pipe.cfg, pipe.dirs(), "test")
    q = queries[0]
    eta = pipe.cfg.teacher.eta
    both = scorer.score_steps(q, [eta * 0.1, eta * 10])
    for r, f in zip(both, (0.1, 10)):
        scorer.tc = derive(pipe.cfg, {"teacher": {"eta": eta * f}}).teacher
        one = scorer.score(q)
        torch.testing.assert_close(r["influence"], one["influence"])
        assert r["query_loss_after"] == pytest.approx(one["query_loss_after"])


def test_study_resumes_per_query_and_the_cli_draws_it(study, capsys):
    """A deleted query file is recomputed alone and gives the same summary; the command prints
    the table and writes the figure; the report shows the section."""
    pipe, s = study
    out = pipe.step_study_dir()
    victim = out / "f100" / "test_0.npy"
    before = np.load(victim)
    victim.unlink()
    code, text, err = run_cli(capsys, "teacher", "steps", "configs/experiment/toy_smoke.yaml",
                              f"output_root={pipe.cfg.output_root}", "--factors",
                              *map(str, FACTORS), "--no-progress")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(victim), before)
    again = json.loads((out / "steps.json").read_text())
    assert again == s
    assert "teacher step study" in text and (out / "steps.png").is_file()
    pipe.run(["student"])  # writes metrics.json and the report
    report = (pipe.root / "report.md").read_text()
    assert "## Teacher step size" in report and "figures/teacher_steps.png" in report


def test_counterfactual_reads_the_study_as_teacher_at_a_factor(study):
    """``teacher@1`` in the counterfactual is the configured teacher's ranking exactly; a factor
    the study did not score is refused with the command that scores it."""
    from attribution.config import ConfigError
    from attribution.counterfactual import method_ranks

    pipe, _ = study
    dirs = {**pipe.dirs(), "steps": pipe.step_study_dir()}
    ranks = method_ranks(pipe.cfg, dirs, ["teacher", "teacher@1", "teacher@0.01"])
    np.testing.assert_array_equal(ranks["teacher@1"], ranks["teacher"])
    assert not np.array_equal(ranks["teacher@0.01"], ranks["teacher"])
    with pytest.raises(ConfigError, match="attribution teacher steps"):
        pipe.run_counterfactual(["teacher@0.5"], [0], 3, progress=False, echo=lambda s: None)


def test_a_damping_axis_preconditions_the_same_gradient_as_a_teacher_with_that_damping(study):
    """Known answer: ``with_damping`` at the configured damping is the same step, and a study
    setting at damping d equals a scorer BUILT with teacher.damping=d (the preconditioner is
    the only thing the damping changes)."""
    from attribution.teacher.run import teacher_scorer

    pipe, _ = study
    scorer, _, queries = teacher_scorer(pipe.cfg, pipe.dirs(), "test")
    q, eta = queries[0], pipe.cfg.teacher.eta
    same = scorer.precondition.with_damping(pipe.cfg.teacher.damping)
    low = scorer.precondition.with_damping(pipe.cfg.teacher.damping / 100)
    rows = scorer.score_steps(q, [eta * 0.1, eta * 0.1, eta * 0.1],
                              [scorer.precondition, same, low])
    torch.testing.assert_close(rows[0]["influence"], rows[1]["influence"])
    other = derive(pipe.cfg, {"teacher": {"damping": pipe.cfg.teacher.damping / 100}})
    built, _, _ = teacher_scorer(other, pipe.dirs(), "test")
    torch.testing.assert_close(rows[2]["influence"],
                               built.score_steps(q, [eta * 0.1])[0]["influence"])
    assert not torch.allclose(rows[0]["influence"], rows[2]["influence"])
    with pytest.raises(ValueError, match="preconditioners"):
        scorer.score_steps(q, [eta], [scorer.precondition, low])


def test_study_with_dampings_and_on_validation_concepts(study):
    """The damping axis adds rows at each damping (agreement only within one damping) and
    leaves the configured rows as they were; the val split scores the training queries that
    prompt a validation concept (heart) over every item, with that concept's known answers."""
    from attribution.config import val_concept_rows
    from attribution.counterfactual import method_ranks

    pipe, s = study
    d0 = pipe.cfg.teacher.damping
    both = pipe.run_step_study(FACTORS, progress=False, dampings=[d0 / 100])
    configured = [r for r in both["rows"] if r["damping"] == d0]
    assert configured == s["rows"]  # the configured files are reused, not rescored
    low = {r["factor"]: r for r in both["rows"] if r["damping"] == d0 / 100}
    assert sorted(low) == FACTORS and low[0.01]["next_factor"] == 1.0
    assert "vs_next.mAP@10" not in low[100.0]
    dirs = {**pipe.dirs(), "steps": pipe.step_study_dir()}
    ranks = method_ranks(pipe.cfg, dirs, ["teacher", f"teacher@1:{d0:g}", f"teacher@1:{d0 / 100:g}"])
    np.testing.assert_array_equal(ranks[f"teacher@1:{d0:g}"], ranks["teacher"])
    assert (ranks[f"teacher@1:{d0 / 100:g}"] >= 0).all()

    val = pipe.run_step_study([1.0], n_queries=3, progress=False, split="val")
    held = val_concept_rows(pipe.cfg)
    assert held and set(held) <= set(val["rows_scored"]) and len(val["rows_scored"]) == 3
    (row,) = val["rows"]
    assert any(k.startswith("shape=heart") for k in row), row.keys()
    assert not any("cross" in k for k in row)  # the test concept is not a choosing answer
    assert (pipe.step_study_dir() / "steps_val.json").is_file()
    assert "training queries" in format_steps(val)
