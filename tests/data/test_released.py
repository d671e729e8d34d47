"""The released-MSCOCO path, on small files in the exact released formats (docs/method.md §6)."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from attribution.common.files import DataFileError
from attribution.config import ConfigError, load_config
from attribution.pipeline import Pipeline
from tests.conftest import ROOT

COCO = ROOT / "configs" / "experiment" / "coco_released.yaml"
SPACES = {"dino": 24, "clip": 12, "clip_text": 12}


def write_released_fixture(root: Path, n_items: int = 400, q_train: int = 60, k: int = 80,
                           q_test: int = 8, seed: int = 0) -> Path:
    """Released-layout files whose teacher follows a hidden 4-d structure.

    Influence = −‖u_q − u_j‖² for hidden codes u.  Every feature space carries u weakly, through
    a random linear map, under stronger nuisance dimensions: untuned cosine finds little, a
    learned head can find more (the known answer the test checks)."""
    rng = np.random.default_rng(seed)
    u_items, u_train, u_test = (rng.standard_normal((n, 4)) for n in (n_items, q_train, q_test))
    feats = root / "feats"
    blocks = {}
    for space, dim in SPACES.items():
        mix = rng.standard_normal((4, dim // 2))
        out = {}
        for name, u in (("data_feats", u_items), ("train_query_feats", u_train),
                        ("test_query_feats", u_test)):
            nuisance = 2.0 * rng.standard_normal((len(u), dim - dim // 2))
            out[name] = np.concatenate([u @ mix, nuisance], 1).astype(np.float32)
        blocks[space] = out
    blocks["dino+clip_text"] = {n: np.concatenate([blocks["dino"][n], blocks["clip_text"][n]], 1)
                                for n in blocks["dino"]}
    for space, arrays in blocks.items():
        (feats / space).mkdir(parents=True)
        for name, arr in arrays.items():
            np.save(feats / space / f"{name}.npy", arr)

    def influence(u):
        return -((u[:, None, :] - u_items[None]) ** 2).sum(-1)

    inf_train = influence(u_train)
    # stage 1: a K-set per training query (here: the teacher's top 2K, then a random K of them)
    subset = np.stack([rng.permutation(np.argsort(-row)[: 2 * k])[:k] for row in inf_train])
    inf_subset = np.take_along_axis(inf_train, subset, 1)
    rank_subset = np.argsort(-inf_subset, axis=1)
    train = {"random": {"rank": np.take_along_axis(subset, rank_subset, 1).astype(np.int64),
                        "influence_subset": inf_subset.astype(np.float32),
                        "rank_influence_subset": rank_subset.astype(np.int64)}}
    inf_test = influence(u_test)
    test = {"random": {"influence": inf_test.astype(np.float32),
                       "rank": np.argsort(-inf_test, axis=1).astype(np.int64)}}
    for split, payload in (("train", train), ("test", test)):
        with open(root / f"influence_{split}.pkl", "wb") as f:
            pickle.dump(payload, f, protocol=4)
    return root


def _cfg(tmp_path, root, *extra):
    return load_config(COCO, [f"output_root={tmp_path / 'runs'}", f"data.root={root}",
                              "student.k_eval=[10,50]", "student.hidden=[64,64]",
                              "student.epochs=15", "student.queries_per_batch=8",
                              "student.pairs_per_query=32", "student.logger=none",
                              "student.num_workers=0", "student.val_queries=6", "student.k_val=10", *extra])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_fixture(tmp_path_factory.mktemp("coco"))


def test_student_trains_on_released_files_and_beats_untuned(released, tmp_path):
    pipe = Pipeline(_cfg(tmp_path, released), progress=False, echo=lambda s: None)
    results = pipe.run()
    assert list(results) == ["student"]
    m = json.loads((pipe.root / "metrics.json").read_text())
    for k in (10, 50):
        assert 0 <= m[f"baseline.dino+clip_text.mAP@{k}"] <= 1
    # known answer: the hidden structure is learnable, the raw cosine mostly sees nuisance
    assert m["student.mAP@50"] > m["baseline.dino+clip_text.mAP@50"] + 0.1
    assert m["student.queries_per_second"] > 0
    assert (pipe.root / "report.md").is_file()
    assert (pipe.dir("student") / "index.faiss").is_file()


def test_every_space_reads(released, tmp_path):
    for space in ("dino", "clip", "clip_text"):
        pipe = Pipeline(_cfg(tmp_path, released, f"student.feature={space}",
                             "student.epochs=1"), progress=False, echo=lambda s: None)
        pipe.run()
        assert json.loads((pipe.dir("student") / "metrics.json").read_text())["feature"] == space


def test_data_root_from_environment(released, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_DATA_ROOT", str(released))
    cfg = load_config(COCO, [f"output_root={tmp_path}"])
    assert Pipeline(cfg).released_root() == released.resolve()
    monkeypatch.delenv("ATTRIBUTION_DATA_ROOT")
    with pytest.raises(DataFileError, match="ATTRIBUTION_DATA_ROOT"):
        Pipeline(cfg).run()


def test_missing_files_are_all_listed(released, tmp_path):
    import shutil

    root = tmp_path / "partial"
    shutil.copytree(released, root)
    (root / "influence_test.pkl").unlink()
    (root / "feats" / "dino+clip_text" / "test_query_feats.npy").unlink()
    pipe = Pipeline(_cfg(tmp_path, root), progress=False, echo=lambda s: None)
    with pytest.raises(DataFileError) as err:
        pipe.run()
    msg = str(err.value)
    assert "influence_test.pkl" in msg and "dino+clip_text/test_query_feats.npy" in msg
    assert "2 file(s)" in msg


def test_wrong_shapes_and_stages_fail_clearly(released, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(released, root)
    np.save(root / "feats" / "dino+clip_text" / "test_query_feats.npy",
            np.zeros((8, 5), np.float32))
    with pytest.raises(DataFileError, match="disagree on the dimension"):
        Pipeline(_cfg(tmp_path, root), progress=False, echo=lambda s: None).run()
    with pytest.raises(ConfigError, match="only the student"):
        Pipeline(_cfg(tmp_path, released)).run(["teacher"])


def test_coco_sweeps_run_on_the_fixture(released, tmp_path):
    from attribution.sweeps import run_sweep

    table = run_sweep(ROOT / "sweeps" / "coco_loss.yaml",
                      [f"data.root={released}", "student.k_eval=[10,50]", "student.epochs=1",
                       "student.hidden=[32]", "student.logger=none", "student.num_workers=0",
                       "student.queries_per_batch=8", "student.pairs_per_query=16",
                       "student.val_queries=6", "student.k_val=10"],
                      output_root=str(tmp_path), echo=lambda s: None)
    from attribution.figures import read_rows

    rows = read_rows(table)
    assert [r["student.loss"] for r in rows] == ["ce", "mse", "ordinal", "listwise"]
    assert all(0 <= float(r["student.mAP@10"]) <= 1 for r in rows)


def test_wandb_scratch_stays_under_the_run_folder(released, tmp_path):
    """An offline W&B student writes its scratch (debug logs, cache, settings) beside the
    stage's folder, not under the user's home."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config")}
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "attribution", "student", str(COCO),
           f"output_root={tmp_path / 'runs'}", f"data.root={released}", "student.epochs=1",
           "student.k_eval=[10]", "student.logger=wandb_offline", "student.num_workers=0",
           "student.val_queries=6", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (home / ".cache" / "wandb").exists() and not (home / ".config" / "wandb").exists()
    assert (tmp_path / "runs" / "coco_released" / ".wandb").is_dir()
