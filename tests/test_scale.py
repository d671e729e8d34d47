"""Scale-out on existing engines, checked on CPU processes (gloo): the teacher's queries split
over two ranks give exactly the one-rank result."""

import pickle

import numpy as np

from attribution.teacher.run import run_teacher
from tests.conftest import smoke_config


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)["random"]


def test_two_rank_teacher_split_equals_one_rank(smoke_run, tmp_path):
    pipe = smoke_run
    pipe.run(["teacher"])  # the one-rank reference (cached across the session)
    one = pipe.dir("teacher")
    cfg = smoke_config(pipe.cfg.output_root, "device=cpu", "teacher.devices=2",
                       "teacher.strategy=ddp_spawn")
    two = tmp_path / "teacher_2ranks"
    summary = run_teacher(cfg, pipe.dir("world"), pipe.dir("text"), pipe.dir("generator"),
                          pipe.dir("queries"), pipe.dir("fisher"), two, progress=False)
    n_queries = pipe.cfg.queries.n_train + pipe.cfg.queries.n_test
    assert summary["queries_scored"] == n_queries
    from attribution.teacher.shards import ShardStore

    store = ShardStore(two)
    ranks = [store.read(s, q)[2]["rank"] for s in ("train", "test") for q in store.done(s)]
    assert len(ranks) == n_queries  # every query exactly once, none lost or doubled
    assert sorted(set(ranks)) == [0, 1] and abs(ranks.count(0) - ranks.count(1)) <= 1
    for split in ("train", "test"):
        a, b = _load(one / f"influence_{split}.pkl"), _load(two / f"influence_{split}.pkl")
        assert np.array_equal(a["rank"], b["rank"])
        key = "influence_subset" if split == "train" else "influence"
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
