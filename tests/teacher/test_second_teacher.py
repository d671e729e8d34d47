"""A second teacher over the test queries (``second_teacher``): every method is also scored
against it, and the report shows both teachers side by side."""

import numpy as np
import pytest

from attribution.pipeline import Pipeline
from tests.conftest import smoke_config


def test_the_run_s_own_teacher_as_second_teacher_agrees_with_it_exactly(finished):
    """Known answer: with no preset and no changes the second teacher IS the run's teacher (same
    settings, same seed): its rankings equal the teacher's, the agreement is 1 both ways, and
    every method scores against it exactly what it scores against the teacher."""
    cfg = smoke_config(finished.cfg.output_root, "second_teacher.enabled=true",
                       "second_teacher.preset=null", "second_teacher.name=same")
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    pipe.run()  # every stage but this one is the finished smoke run's
    with np.load(pipe.dir("teacher") / "teacher_test.npz") as t, \
            np.load(pipe.dir("second_teacher") / "teacher_test.npz") as s:
        np.testing.assert_allclose(s["influence"], t["influence"], rtol=1e-5, atol=1e-9)
    m = pipe.write_metrics()
    k = cfg.student.k_eval[0]
    assert m[f"second.teacher.mAP@{k}"] == pytest.approx(1.0)
    assert m[f"teacher.second.mAP@{k}"] == pytest.approx(1.0)
    assert m[f"second.student.mAP@{k}"] == pytest.approx(m[f"student.mAP@{k}"])
    feature = cfg.student.feature
    assert m[f"second.baseline.{feature}.mAP@{k}"] == pytest.approx(
        m[f"baseline.{feature}.mAP@{k}"])
    assert m[f"second.student.planted.mAP@{k}"] == pytest.approx(
        m[f"student.planted.mAP@{k}"])
    from attribution.report import write_report

    report = write_report(pipe).read_text()
    assert f"mAP@{k} vs same (s.e.)" in report and "**A second teacher.**" in report


def test_the_published_step_as_second_teacher_runs_test_queries_only(smoke_run):
    """The default second teacher (the published AbU+ step: gain N²) ranks every test query
    over the whole set, with a key of its own; the run's teacher, student and baselines are
    those of the run without it (their keys do not move)."""
    plain = Pipeline(smoke_run.cfg, progress=False, echo=lambda s: None)
    cfg = smoke_config(smoke_run.cfg.output_root, "second_teacher.enabled=true",
                       "second_teacher.teacher={estimator: quadratic}")
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    for stage in ("teacher", "student", "baselines", "ceiling"):
        assert pipe.key(stage) == plain.key(stage), stage
    result = pipe.run(["second_teacher"])["second_teacher"]
    assert result.summary["gain"] == pytest.approx(cfg.world.n_items ** 2)
    assert result.summary["estimator"] == "quadratic"
    with np.load(pipe.dir("second_teacher") / "teacher_test.npz") as s:
        assert s["rank"].shape == (cfg.queries.n_test, cfg.world.n_items)
    assert not list(pipe.dir("second_teacher").glob("test_*train*"))  # no training queries
