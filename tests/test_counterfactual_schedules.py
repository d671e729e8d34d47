"""compare_schedules: does a shorter retraining schedule rank removals as the full one does?"""

import numpy as np
import pytest

from attribution.counterfactual.results import compare_schedules, format_schedules


def _result(steps, values):
    return {"steps": steps, "k": 10, "rows": [{"method": m, "query": q, "delta_loss": v}
                                     for (m, q), v in values.items()]}


def test_a_scaled_copy_agrees_exactly_and_a_reversal_is_caught():
    """Known answers: a short schedule whose ΔLoss is the full one's times 0.3 correlates 1 and
    recovers the scale; every pairwise difference keeps its sign.  Reversing the methods'
    order flips the signs and the correlation."""
    rng = np.random.default_rng(0)
    full = {(m, q): base + rng.normal(0, 0.1) for q in range(6)
            for m, base in (("teacher", 2.0), ("student", 1.0), ("random", 0.0))}
    same = compare_schedules(_result(1000, full), _result(300, {k: 0.3 * v
                                                                for k, v in full.items()}))
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["scale"] == pytest.approx(1 / 0.3)
    assert len(same["pairs"]) == 3 and all(p["same_sign"] for p in same["pairs"])
    flipped = compare_schedules(_result(1000, full), _result(300, {k: -v
                                                                   for k, v in full.items()}))
    assert flipped["pearson"] < -0.9 and not any(p["same_sign"] for p in flipped["pairs"])
    assert "Spearman" in format_schedules(same)
    with pytest.raises(ValueError, match="different numbers"):
        compare_schedules(_result(1000, full), {**_result(300, full), "k": 5})
    with pytest.raises(ValueError, match="share 0"):
        compare_schedules(_result(1000, full), _result(300, {("x", 99): 1.0}))


def test_result_files_and_schedule_pairs_pair_each_split_full_with_its_shorter(tmp_path):
    """One rule for the CLI and the report: within a split the full-length file is compared
    with each shorter one (a reason instead where they cannot be compared); splits never mix."""
    import json

    from attribution.counterfactual.results import (
        format_schedule_pairs,
        result_files,
        schedule_pairs,
    )

    rng = np.random.default_rng(1)
    full = {(m, q): base + rng.normal(0, 0.1) for q in range(4)
            for m, base in (("teacher", 2.0), ("random", 0.0))}
    files = {"counterfactual.json": _result(1000, full),
             "counterfactual_s300.json": _result(300, {k: 0.5 * v for k, v in full.items()}),
             "counterfactual_s50.json": {**_result(50, full), "k": 3},
             "counterfactual_val_s300.json": _result(300, full)}
    for name, r in files.items():
        (tmp_path / name).write_text(json.dumps(r))
    assert [p.name for p in result_files(tmp_path)] == [
        "counterfactual.json", "counterfactual_s50.json", "counterfactual_s300.json",
        "counterfactual_val_s300.json"]
    pairs = schedule_pairs(tmp_path)  # the val split has no full-length file: nothing to pair
    assert [(p["split"], p["short"]) for p in pairs] == [
        ("test", "counterfactual_s50.json"), ("test", "counterfactual_s300.json")]
    assert pairs[0]["comparison"] is None and "different numbers" in pairs[0]["why"]
    assert pairs[1]["comparison"]["scale"] == pytest.approx(2.0)
    text = format_schedule_pairs(pairs)
    assert "not compared" in text and "Spearman" in text
    (tmp_path / "counterfactual_val.json").write_text(json.dumps(_result(1000, full)))
    assert [p["split"] for p in schedule_pairs(tmp_path)] == ["test", "test", "val"]


def test_both_studies_read_the_same_query_set_per_split():
    """One mapping serves the step study and the counterfactual: ``test`` reads the test
    queries, ``val`` (choosing) the training queries; an unknown split is refused by each in its
    own error type (the counterfactual's is a config error, shown without a traceback)."""
    from attribution.config import ConfigError
    from attribution.counterfactual.results import query_split
    from attribution.data.queries import study_query_set

    assert [study_query_set(s) for s in ("test", "val")] == ["test", "train"]
    assert [query_split(s) for s in ("test", "val")] == ["test", "train"]
    with pytest.raises(ValueError, match="'train'"):
        study_query_set("train")
    with pytest.raises(ConfigError, match="counterfactual split 'dev'"):
        query_split("dev")


def test_another_k_has_a_result_file_of_its_own(tmp_path):
    """``-k`` other than 10 writes beside the k = 10 result instead of replacing it, and is
    never paired with another k's schedule."""
    import json

    from attribution.counterfactual.results import result_file, result_files, schedule_pairs
    from tests.conftest import smoke_config

    cfg = smoke_config(tmp_path)
    names = [result_file(cfg, tmp_path, steps, split, k).name for steps, split, k in (
        (None, "test", 10), (None, "test", 5), (300, "test", 5), (None, "val", 20))]
    assert names == ["counterfactual.json", "counterfactual_k5.json",
                     "counterfactual_s300_k5.json", "counterfactual_val_k20.json"]
    rng = np.random.default_rng(0)
    full = {(m, q): base + rng.normal(0, 0.1) for q in range(4)
            for m, base in (("teacher", 2.0), ("random", 0.0))}
    for name in names:
        (tmp_path / name).write_text(json.dumps(_result(1000, full)))
    assert [p.name for p in result_files(tmp_path)][0] == "counterfactual.json"
    assert schedule_pairs(tmp_path) == []  # the k = 5 short schedule is not the k = 10's
