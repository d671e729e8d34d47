"""Scale-out on existing engines, checked with CPU processes (gloo): the teacher's queries split
over two ranks, the generator's and the student's global batches split over two ranks, give the
one-rank result."""

import pickle

import numpy as np
import pytest

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
    # L_j(θ0) computed once, half the items per rank, merged: equal to the one-rank cache
    halves = [np.load(two / f"base_losses.part{r}of2.npy") for r in (0, 1)]
    n_items = pipe.cfg.world.n_items
    assert [len(h) for h in halves] == [n_items // 2, n_items - n_items // 2]
    np.testing.assert_allclose(np.load(two / "base_losses.npy"),
                               np.load(one / "base_losses.npy"), rtol=0, atol=1e-6)
    for split in ("train", "test"):
        a, b = _load(one / f"influence_{split}.pkl"), _load(two / f"influence_{split}.pkl")
        assert np.array_equal(a["rank"], b["rank"])
        key = "influence_subset" if split == "train" else "influence"
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)


def test_two_process_ddp_student_equals_one_process(smoke_run, tmp_path):
    """Same global batch (4 queries x 16 pairs), split 2 x 2 over gloo ranks: same weights."""
    import json

    import torch

    from attribution.student.train import train_student

    pipe = smoke_run
    pipe.run(["features", "teacher"])
    common = ["device=cpu", "student.dropout=0", "student.queries_per_batch=4",
              "student.epochs=2", "student.logger=none",
              # the reported head is the last epoch's: what the two layouts must agree on
              "student.val_queries=0"]
    outs = {}
    for name, extra in (("one", []), ("two", ["student.devices=2",
                                              "student.strategy=ddp_spawn"])):
        cfg = smoke_config(pipe.cfg.output_root, *common, *extra)
        outs[name] = train_student(cfg, pipe.dir("features"), pipe.dir("teacher"),
                                   tmp_path / name, progress=False)
    a = torch.load(tmp_path / "one" / "head.pt")
    b = torch.load(tmp_path / "two" / "head.pt")
    assert set(a) == set(b)
    for k in a:  # Adam divides by √v: a near-zero gradient's summation-order rounding moves
        # its weight by up to ~lr·1e-2 (seen: 2.5e-5 on 1 of 200,704), far below training's 1e-3
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5)
    # and training did move them: the head as initialized (same seed) differs
    import lightning as L

    from attribution.student.head import EmbeddingHead, head_dims

    sc = smoke_config(pipe.cfg.output_root, *common).student
    L.seed_everything(pipe.cfg.seed, verbose=False)
    in_dim = json.loads((tmp_path / "one" / "head.json").read_text())["dims"][0]
    init = EmbeddingHead(head_dims(sc.head, in_dim, list(sc.hidden)), 0.0, sc.layernorm,
                         sc.alpha_init, sc.head, whiten=sc.whiten > 0).state_dict()
    fixed = {"center", "whitener"}  # the whitening buffers are fitted, not trained
    assert max(float((a[k] - init[k]).abs().max()) for k in a if k not in fixed) > 1e-3
    for k in pipe.cfg.student.k_eval:
        assert outs["one"][f"student.mAP@{k}"] == pytest.approx(outs["two"][f"student.mAP@{k}"],
                                                                abs=1e-6)
    assert json.loads((tmp_path / "two" / "head.json").read_text())["dims"][0] > 0


def test_teacher_ranks_wait_for_each_other_as_long_as_configured(tmp_path):
    """Several teacher processes get a process group whose timeout is teacher.timeout_hours
    (torch's 30-minute default is shorter than ranks can finish apart); one process gets the
    plain strategy."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from attribution.teacher.run import teacher_strategy
    from tests.conftest import smoke_config

    one = smoke_config(tmp_path).teacher
    assert teacher_strategy(one) == "auto"
    many = smoke_config(tmp_path, "teacher.devices=2", "teacher.strategy=ddp_spawn",
                        "teacher.timeout_hours=6").teacher
    strategy = teacher_strategy(many)
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(hours=6)
    assert strategy._start_method == "spawn"


def test_two_process_generator_equals_one_process(smoke_run, tmp_path):
    """generator.train.devices=2: each rank trains on its half of the same global batch, so
    the two-rank generator is the one-rank generator (to the rounding of a gradient averaged
    over ranks), and its cache key is the same."""
    import torch

    from attribution.generator.model import load_unet
    from attribution.generator.train import train_generator
    from attribution.stage_table import key_sections

    common = ["device=cpu", "generator.train.steps=4", "generator.train.steps_per_epoch=4"]
    out = {}
    for name, extra in (("one", []), ("two", ["generator.train.devices=2",
                                              "generator.train.strategy=ddp_spawn"])):
        cfg = smoke_config(smoke_run.cfg.output_root, *common, *extra)
        out[name] = train_generator(cfg, smoke_run.dir("world"), smoke_run.dir("text"),
                                    tmp_path / name, progress=False)
        out[name + "_key"] = key_sections(cfg, "generator")
    assert out["one_key"] == out["two_key"]
    a, b = (load_unet(tmp_path / n)[0].state_dict() for n in ("one", "two"))
    assert out["one"]["steps"] == out["two"]["steps"] == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5, msg=k)
    assert out["one"]["final_loss"] == pytest.approx(out["two"]["final_loss"], rel=1e-3)
    with pytest.raises(ValueError, match="one device"):
        train_generator(smoke_config(smoke_run.cfg.output_root, *common,
                                     "generator.train.devices=2"),
                        smoke_run.dir("world"), smoke_run.dir("text"), tmp_path / "x",
                        progress=False, exclude=[0])


def test_two_rank_ceiling_and_second_teacher_equal_one_rank(smoke_run, tmp_path):
    """teacher.devices=2: the ceiling's replicate and curation sample, and the second teacher,
    are spread over two ranks like the teacher; every rescored row equals the one-rank row."""
    from attribution.teacher.ceiling import run_ceiling
    from attribution.teacher.second import run_second_teacher

    pipe = smoke_run
    pipe.run(["teacher"])
    d = pipe.dirs()
    args = (d["world"], d["text"], d["generator"], d["queries"], d["fisher"])
    common = ["device=cpu", "ceiling.test_queries=3", "ceiling.curation_queries=2",
              "second_teacher.enabled=true"]
    rows = {}
    for name, extra in (("one", []), ("two", ["teacher.devices=2",
                                              "teacher.strategy=ddp_spawn"])):
        cfg = smoke_config(pipe.cfg.output_root, *common, *extra)
        summary = run_ceiling(cfg, *args, d["teacher"], tmp_path / f"ceiling_{name}",
                              progress=False)
        second = run_second_teacher(cfg, *args, tmp_path / f"second_{name}", progress=False)
        assert summary["self_queries"] == 3 and second["queries"] == pipe.cfg.queries.n_test
        rows[name] = {p.name: np.load(p) for p in sorted(
            [*(tmp_path / f"ceiling_{name}").glob("*_train_*.npy"),
             *(tmp_path / f"ceiling_{name}").glob("replicate_test_*.npy"),
             *(tmp_path / f"second_{name}").glob("test_*.npy")])}
    assert rows["one"].keys() == rows["two"].keys() and len(rows["one"]) == 3 + 2 + \
        pipe.cfg.queries.n_test
    for key, row in rows["one"].items():
        np.testing.assert_allclose(rows["two"][key], row, rtol=0, atol=1e-6, err_msg=key)
    parts = sorted(p.name for p in (tmp_path / "ceiling_two").glob("base_losses.part*.npy"))
    assert parts == ["base_losses.part0of2.npy", "base_losses.part1of2.npy"]  # split too
