"""The teacher's ceiling (agreement with itself under fresh noise) and its curation recall."""

import json

import numpy as np
import pytest

from attribution.common.files import DataFileError
from attribution.teacher.ceiling import (
    curation_recall,
    query_scores,
    self_agreement,
    stratified_rows,
)


@pytest.fixture(scope="module")
def ceiling_run(smoke_run):
    smoke_run.run(["ceiling", "student"])
    return smoke_run


def test_curation_recall_known_answer():
    scores = np.array([[9.0, 8, 7, 6, 5, 4], [1.0, 2, 3, 4, 5, 6]])
    ksets = np.array([[0, 1, 5], [5, 4, 0]])
    out = curation_recall(scores, ksets, [2, 3])
    # query 0: top-2 {0, 1} both kept, top-3 {0, 1, 2}: 2 of 3; query 1: top-2 {5, 4}, top-3
    # {5, 4, 3}: 2 of 3
    assert out["curation_recall@2"] == pytest.approx(1.0)
    assert out["curation_recall@3"] == pytest.approx(2 / 3)
    assert out["curation_recall@3_stderr"] == pytest.approx(0.0)


def test_full_set_scores_equal_the_teacher_inside_the_kset(ceiling_run):
    """Same seed, same draws: the full-set rescoring of a training query reproduces the
    teacher's own influences on its K-set (what makes the recall a statement about curation,
    not about noise)."""
    out = ceiling_run.dir("ceiling")
    with np.load(ceiling_run.dir("teacher") / "teacher_train.npz") as t:
        cands, influence, ids = t["candidates"], t["influence"], t["query_ids"]
    summary = json.loads((out / "ceiling.json").read_text())
    assert summary["curation_queries"] > 0
    for row in range(summary["curation_queries"]):
        full = np.load(out / f"fullset_train_{ids[row]}.npy")
        np.testing.assert_allclose(full[cands[row]], influence[row], rtol=1e-4, atol=1e-7)


def test_replicate_uses_fresh_noise_and_lands_in_the_metrics(ceiling_run):
    out = ceiling_run.dir("ceiling")
    with np.load(ceiling_run.dir("teacher") / "teacher_test.npz") as t:
        influence = t["influence"]
    rep = np.load(out / "replicate_test_0.npy")
    assert rep.shape == influence[0].shape and not np.allclose(rep, influence[0])
    m = ceiling_run.write_metrics()
    k = ceiling_run.cfg.student.k_eval[0]
    assert 0 < m[f"teacher.self_mAP@{k}"] <= 1 and m[f"teacher.self_mAP@{k}_stderr"] >= 0
    assert 0 <= m["teacher.curation_recall@10"] <= 1
    # the ceiling per query type (planted concepts / ordinary) recombines into the whole: the
    # query-weighted mean of the two is the overall figure
    from attribution.evaluation import query_types

    n = m["teacher.self_queries"]
    masks = {t: mask[:n] for t, mask in query_types(ceiling_run.cfg,
                                                    ceiling_run.dir("queries")).items()}
    assert masks["planted"].any() and masks["ordinary"].any()
    assert sum(masks[t].sum() * m[f"teacher.self.{t}.mAP@{k}"] for t in masks) / n == (
        pytest.approx(m[f"teacher.self_mAP@{k}"]))
    from attribution.report import write_report

    report = write_report(ceiling_run).read_text()
    assert "**Ceiling.**" in report and "fresh noise (ceiling)" in report
    assert f"On planted queries alone: {m[f'teacher.self.planted.mAP@{k}']:.3f}" in report
    assert "## Curation recall" in report


def test_curation_alternatives_reproduce_the_run_s_own_kset(ceiling_run):
    """The alternatives table recomputes stage 1 for every space; for the run's own space and K
    it must give the same recall as the teacher's stored K-sets."""
    out = ceiling_run.dir("ceiling")
    rows = json.loads((out / "curation.json").read_text())
    tc = ceiling_run.cfg.teacher
    assert {r["space"] for r in rows} == {"pixels", "text", "pixels+text"}
    own = [r for r in rows if (r["space"], r["K"]) == (tc.curation, tc.k)]
    summary = json.loads((out / "ceiling.json").read_text())
    assert len(own) == 1 and own[0]["recall@10"] == pytest.approx(
        summary["curation_recall@10"])
    # a larger K can only keep more of the top 10
    for space in ("pixels", "text", "pixels+text"):
        recalls = [r["recall@10"] for r in sorted(rows, key=lambda r: r["K"])
                   if r["space"] == space]
        assert recalls == sorted(recalls)


def test_a_corrupt_query_file_is_named_and_nothing_is_rescored(tmp_path):
    class Never:
        def score(self, q):
            raise AssertionError("a cached query must not be rescored")

    class Q:
        query_id = 3

    np.save(tmp_path / "replicate_test_3.npy", np.ones(5, np.float32))
    scores, fresh = query_scores(Never(), [Q()], tmp_path, "replicate_test", 5, False)
    assert scores.shape == (1, 5) and fresh == 0
    (tmp_path / "replicate_test_3.npy").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="replicate_test_3.npy"):
        query_scores(Never(), [Q()], tmp_path, "replicate_test", 5, False)
    np.save(tmp_path / "replicate_test_3.npy", np.full(5, np.nan, np.float32))
    with pytest.raises(DataFileError, match="finite"):
        query_scores(Never(), [Q()], tmp_path, "replicate_test", 5, False)


def test_a_sample_of_test_queries_is_stratified_like_the_test_set():
    """100 test queries, the first 20 planted (as the queries stage writes them): a sample of
    40 takes 8 planted and 32 ordinary (the test set's 20 %), not the first 40 (half planted)."""
    planted = np.zeros(100, bool)
    planted[:20] = True
    types = {"ordinary": ~planted, "planted": planted}
    rows = stratified_rows(types, 100, 40, seed=0)
    assert len(rows) == 40 == len(set(rows.tolist())) and planted[rows].sum() == 8
    assert np.array_equal(rows, stratified_rows(types, 100, 40, seed=0))
    assert not np.array_equal(rows, stratified_rows(types, 100, 40, seed=1))
    assert np.array_equal(stratified_rows(types, 100, 100, seed=0), np.arange(100))
    assert planted[stratified_rows(types, 100, 3, seed=0)].sum() == 1  # every type kept
    assert len(stratified_rows({}, 100, 7, seed=0)) == 7


def test_ceiling_overall_is_weighted_as_the_test_set(tmp_path):
    """Known answer: 10 test queries, 2 planted.  The replicate agrees perfectly on the planted
    ones it rescored (AP 1) and ranks the teacher's top 3 last of 30 on the ordinary ones (AP
    (1/28 + 2/29 + 3/30)/3); rescored: both planted and 2 ordinary.  The plain mean over the
    sample weighs the two kinds half and half; the ceiling weighs them as the test set does,
    20 % planted."""
    n_items, k = 30, 3
    teacher = np.stack([np.random.default_rng(i).permutation(n_items) for i in range(10)])
    planted = np.zeros(10, bool)
    planted[:2] = True
    rows = np.array([0, 1, 5, 7])
    for i in rows:
        score = np.zeros(n_items, np.float32)
        if planted[i]:  # the replicate ranks the teacher's top k first
            score[teacher[i, :k]] = 1.0
        else:  # ...or last
            score[:] = 1.0
            score[teacher[i, :k]] = 0.0
        np.save(tmp_path / f"replicate_test_{i}.npy", score)
    out = self_agreement(tmp_path, teacher, [k], rows,
                         {"ordinary": ~planted, "planted": planted})
    last = (1 / 28 + 2 / 29 + 3 / 30) / 3
    assert out[f"self.planted.mAP@{k}"] == pytest.approx(1.0)
    assert out[f"self.ordinary.mAP@{k}"] == pytest.approx(last)
    assert out[f"self_mAP@{k}"] == pytest.approx(0.2 * 1.0 + 0.8 * last)
    assert out[f"self_mAP@{k}_stderr"] == pytest.approx(0.0, abs=1e-12)  # no spread in a kind
