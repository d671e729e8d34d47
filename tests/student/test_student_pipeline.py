"""The student stage on the smoke run: outputs, checkpoint round trip, attribute, bad inputs."""

import json
import shutil

import numpy as np
import pytest
import torch

from attribution.cli import main
from attribution.common.files import DataFileError
from attribution.features.cache import space_dir
from attribution.student.deploy import load_head
from attribution.student.train import train_student
from tests.conftest import SMOKE


@pytest.fixture(scope="module")
def student_run(smoke_run):
    smoke_run.run(["student"])
    return smoke_run


def test_metrics_have_student_baseline_and_throughput(student_run):
    m = json.loads((student_run.dir("student") / "metrics.json").read_text())
    f = student_run.cfg.student.feature
    for k in student_run.cfg.student.k_eval:
        assert 0 <= m[f"student.mAP@{k}"] <= 1 and f"student.mAP@{k}_stderr" in m
        assert f"baseline.{f}.mAP@{k}" in m
    assert m["student.search_queries_per_second"] > 0
    assert m["alpha"] > 0


def test_run_metrics_json_keys_and_student_only_rerun(student_run):
    from attribution.pipeline import ORDER, Pipeline
    from tests.conftest import smoke_config

    m = student_run.write_metrics()
    assert json.loads((student_run.root / "metrics.json").read_text()) == m
    f = student_run.cfg.student.feature
    for k in student_run.cfg.student.k_eval:
        for key in (f"student.mAP@{k}", f"student.mAP@{k}_stderr", f"baseline.{f}.mAP@{k}"):
            assert key in m
    for key in ("teacher.seconds_per_query", "student.queries_per_second",
                "search.queries_per_second"):
        assert m[key] > 0
    assert m["speedup_vs_teacher"] == pytest.approx(
        m["teacher.seconds_per_query"] * m["student.queries_per_second"])
    other = Pipeline(smoke_config(student_run.cfg.output_root, "student.loss=mse"))
    changed = [s for s in ORDER if other.dir(s) != student_run.dir(s)]
    assert changed == ["student", "abc"]  # the benchmark scores the student too


def test_checkpoint_roundtrip_gives_identical_embeddings(student_run, tmp_path):
    from tests.conftest import smoke_config

    # without validation queries the deployed head is the last epoch's, as last.ckpt holds it
    cfg = smoke_config(student_run.cfg.output_root, "student.val_queries=0", "student.epochs=2",
                       "student.logger=none")
    d = tmp_path / "s"
    train_student(cfg, student_run.dir("features"), student_run.dir("teacher"), d,
                  progress=False)
    head = load_head(d)
    ckpt = torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    again = load_head(d)
    again.load_state_dict({k[len("head."):]: v for k, v in ckpt["state_dict"].items()
                           if k.startswith("head.")})
    x = torch.randn(5, head.in_dim)
    assert torch.equal(head.embed(x), again.embed(x))


def test_attribute_command(student_run, tmp_path, capsys):
    q = student_run.dir("queries") / "query_test"
    prompt = (q / "captions.txt").read_text().splitlines()[0]
    rc = main(["attribute", str(SMOKE), f"output_root={student_run.cfg.output_root}",
               "--image", str(q / "images" / "0.png"), "--prompt", prompt, "-k", "5",
               "--grid", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert rc == 0 and "rank" in out and (tmp_path / "g.png").is_file()
    assert len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) == 5
    assert main(["attribute", str(SMOKE), f"output_root={student_run.cfg.output_root}",
                 "--image", str(tmp_path / "nope.png"), "--prompt", "x"]) == 2


def _copy_features(student_run, tmp_path):
    dst = tmp_path / "features"
    shutil.copytree(student_run.dir("features"), dst)
    return dst, space_dir(dst, student_run.cfg.student.feature)


def test_mismatched_lengths_fail_before_training(student_run, tmp_path):
    feats, folder = _copy_features(student_run, tmp_path)
    arr = np.load(folder / "query_train.npy")
    np.save(folder / "query_train.npy", arr[:-1])
    man = json.loads((folder / "manifest.json").read_text())
    man["counts"]["query_train"] -= 1
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataFileError, match="teacher ranked"):
        train_student(student_run.cfg, feats, student_run.dir("teacher"), tmp_path / "s",
                      progress=False)
    assert not (tmp_path / "s" / "checkpoints").exists()


def test_nan_features_fail_before_training(student_run, tmp_path):
    feats, folder = _copy_features(student_run, tmp_path)
    arr = np.load(folder / "items.npy")
    arr[3, 0] = np.nan
    np.save(folder / "items.npy", arr)
    with pytest.raises(FloatingPointError, match="non-finite rows \\[3\\]"):
        train_student(student_run.cfg, feats, student_run.dir("teacher"), tmp_path / "s",
                      progress=False)


def test_wandb_offline_logging_and_m_bound(student_run, tmp_path, monkeypatch):
    from tests.conftest import smoke_config

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = smoke_config(student_run.cfg.output_root, "student.logger=wandb_offline",
                       "student.epochs=1")
    m = train_student(cfg, student_run.dir("features"), student_run.dir("teacher"),
                      tmp_path / "wb", progress=False)
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert m["student.mAP@5"] >= 0
    # refused at load now (before any stage runs); the data module keeps its own guard for
    # released rankings, whose K the config cannot know
    with pytest.raises(ValueError, match="student.m=51 exceeds .*teacher.k=50"):
        smoke_config(student_run.cfg.output_root, f"student.m={cfg.teacher.k + 1}")
    from attribution.student.data import PairPlan

    with pytest.raises(ValueError, match="M=51 of K=50"):
        PairPlan(np.zeros((2, 50), np.int64), 200, 16, 0.1, 51, 0)
