import json
import math

import pytest

from attribution import figures


def _rows():
    # two seeds at Q=10, one run at Q=40 (its own per-query stderr is used)
    return [
        {"student.n_queries": "10", "student.seed": "0", "student.mAP@10": "0.2",
         "student.mAP@10_stderr": "0.05"},
        {"student.n_queries": "10", "student.seed": "1", "student.mAP@10": "0.4",
         "student.mAP@10_stderr": "0.05"},
        {"student.n_queries": "40", "student.seed": "0", "student.mAP@10": "0.5",
         "student.mAP@10_stderr": "0.03"},
    ]


def test_aggregate_mean_and_standard_error_over_seeds():
    pts = {p["x"]: p for p in figures.aggregate(_rows(), "student.n_queries", "student.mAP@10")}
    assert pts["10"]["mean"] == pytest.approx(0.3)
    # std (ddof=1) of {0.2, 0.4} = 0.1414..; / sqrt(2) = 0.1 over seeds; with the runs' own
    # s.e. over their shared test queries (0.05): sqrt(0.1² + 0.05²)
    assert pts["10"]["stderr"] == pytest.approx(math.hypot(0.1, 0.05))
    assert pts["10"]["over"] == "seeds + test queries" and pts["10"]["n"] == 2
    bare = [{k: v for k, v in r.items() if not k.endswith("_stderr")} for r in _rows()[:2]]
    pt = figures.aggregate(bare, "student.n_queries", "student.mAP@10")[0]
    assert pt["stderr"] == pytest.approx(0.1) and pt["over"] == "seeds"  # no query s.e. known
    assert pts["40"]["stderr"] == pytest.approx(0.03) and pts["40"]["over"] == "test queries"
    same = [dict(r, **{"student.mAP@10": "0.2"}) for r in _rows()[:2]]  # seed-independent
    pt = figures.aggregate(same, "student.n_queries", "student.mAP@10")[0]
    assert pt["stderr"] == pytest.approx(0.05) and pt["over"] == "test queries"


def test_sweep_figures_numeric_categorical_and_tuned_pairs(tmp_path):
    png = b"\x89PNG"
    line = figures.sweep_figure(_rows(), "student.n_queries", "student.mAP@10",
                                tmp_path / "line.png")
    assert line.read_bytes()[:4] == png
    loss = [{"student.loss": n, "student.mAP@10": str(v), "student.mAP@10_stderr": "0.01"}
            for n, v in (("ce", 0.4), ("mse", 0.2))]
    assert figures.sweep_figure(loss, "student.loss", "student.mAP@10",
                                tmp_path / "bars.png").read_bytes()[:4] == png
    feats = [{"student.feature": f, "student.mAP@10": "0.5",
              f"baseline.{f}.mAP@10": "0.2", f"baseline.{f}.mAP@10_stderr": "0.02"}
             for f in ("pixels", "minilm")]
    assert figures.sweep_figure(feats, "student.feature", "student.mAP@10",
                                tmp_path / "pairs.png").read_bytes()[:4] == png
    with pytest.raises(ValueError, match="no finished runs"):
        figures.sweep_figure([], "student.loss", "student.mAP@10", tmp_path / "none.png")


def test_a_grid_over_two_parameters_gets_a_bar_per_combination(tmp_path):
    from attribution.figures.sweeps import combined_axis

    rows = [{"student.head": h, "student.whiten": w, "student.mAP@10": str(v),
             "student.mAP@10_stderr": "0.01"}
            for (h, w), v in {("linear", "0.0"): 0.4, ("linear", "0.01"): 0.6,
                              ("residual", "0.0"): 0.5, ("residual", "0.01"): 0.3}.items()]
    x_key, combo = combined_axis(rows, ["student.head", "student.whiten"])
    pts = {p["x"]: p["mean"] for p in figures.aggregate(combo, x_key, "student.mAP@10")}
    assert pts == {"head=linear, whiten=0.0": 0.4, "head=linear, whiten=0.01": 0.6,
                   "head=residual, whiten=0.0": 0.5, "head=residual, whiten=0.01": 0.3}
    assert combined_axis(rows, ["student.head"]) == ("student.head", rows)
    assert figures.sweep_figure(combo, x_key, "student.mAP@10",
                                tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_from_wandb_flattens_config_like_a_local_table():
    class Run:
        state = "finished"
        config = {"student": {"loss": "ce", "m": 50}, "student.loss": "ce", "seed": 0}
        summary = {"student.mAP@10": 0.3, "_runtime": 5}

    class Crashed(Run):
        state = "crashed"

    class Api:
        def sweep(self, path):
            assert path == "me/proj/abc"
            return type("S", (), {"runs": [Run(), Crashed()]})()

    rows = figures.rows_from_wandb("me/proj/abc", api=Api())
    assert rows == [{"student.loss": "ce", "student.m": 50, "seed": 0,
                     "student.mAP@10": 0.3}]


def test_methods_of_run_places_teacher_student_and_baseline():
    metrics = {"student.mAP@10": 0.4, "student.mAP@10_stderr": 0.05,
               "baseline.pixels.mAP@10": 0.2, "baseline.pixels.queries_per_second": 90.0,
               "baseline.pixels.storage_bytes": 100, "student.queries_per_second": 80.0,
               "student.storage_bytes": 50, "teacher.seconds_per_query": 10.0,
               "teacher.storage_bytes": 1000}
    by = {m["method"]: m for m in figures.methods_of_run(metrics, 10)}
    assert by["teacher AbU+ (reference)"]["qps"] == pytest.approx(0.1)
    assert by["teacher AbU+ (reference)"]["quality"] == 1.0
    assert by["untuned pixels"]["quality"] == 0.2 and by["student (ours)"]["storage"] == 50


def test_report_of_smoke_run(smoke_run):
    """The main job's last step: metrics.json keys, figures and report.md."""
    from attribution.pipeline import Pipeline

    pipe = Pipeline(smoke_run.cfg, progress=False, echo=lambda s: None)
    pipe.run()
    metrics = json.loads((pipe.root / "metrics.json").read_text())
    feature = pipe.cfg.student.feature
    for key in (f"baseline.{feature}.queries_per_second", "teacher.storage_bytes",
                "student.storage_bytes", f"baseline.{feature}.storage_bytes"):
        assert metrics[key] > 0 and math.isfinite(metrics[key]), key
    # the student index stores head embeddings, the baseline the raw features
    dims = json.loads((pipe.dir("student") / "head.json").read_text())["dims"]
    assert metrics["student.storage_bytes"] == metrics["n_items"] * dims[-1] * 4
    assert metrics[f"baseline.{feature}.storage_bytes"] == metrics["n_items"] * dims[0] * 4
    for who in ("student", "teacher", f"baseline.{feature}"):  # planted known answers
        for concept in ("shape=cross", "colour=pink"):
            assert 0 <= metrics[f"{who}.{concept}_recall@10"] <= 1
    report = (pipe.root / "report.md").read_text()
    assert "| shape=cross recall@10 |" in report
    for fig in ("tuned_vs_untuned.png", "quality_vs_throughput.png"):
        assert f"figures/{fig}" in report
        assert (pipe.root / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    assert "## Beside the paper" in report and "speed-up of the student over AbU+" in report
    assert "tuned > untuned" in report or "tuned does NOT beat untuned" in report
    # no sweep of this experiment has run here: the claims section says how to get its table
    assert "## The paper's qualitative claims" in report
    assert f"No sweep of experiment `{pipe.cfg.name}` has finished" in report
    # known-answer recall carries its standard error over the concept's queries
    for concept in ("shape=cross", "colour=pink"):
        assert metrics[f"student.{concept}_recall@10_stderr"] >= 0
