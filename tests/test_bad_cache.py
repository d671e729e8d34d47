"""Corrupted cached files of a finished run and of an unfinished one (checkpoints, shards):
named with the command that rebuilds them, nothing else rewritten.

Every case is ONE clear error line (exit code 2) that names the key or the file, before any
stage spends work, and no traceback.  The cases run through ``attribution.cli.main`` in-process
(a traceback would be an exception escaping ``main`` and fail the test).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import SMOKE, Exploit, assert_clear, run_cli


def _copy_run(finished, tmp_path: Path) -> tuple[Path, list[str]]:
    """A private copy of the finished run's folder, and the overrides that point at it."""
    src = Path(finished.cfg.output_root)
    dst = tmp_path / "runs"
    shutil.copytree(src, dst)
    return dst / finished.cfg.name, [f"output_root={dst}"]


def _stage_dir(run: Path, stage: str, finished) -> Path:
    return run / finished.dir(stage).name


def _flip_byte(path: Path, offset: int = -40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


CORRUPTIONS = [
    # (stage, file inside the stage folder, how)
    ("features", "toyclip_image__minilm/items.npy", _flip_byte),
    ("features", "toyclip_image__minilm/items.npy", _truncate),
    ("features", "pixels/query_test.npy", _flip_byte),
    ("features", "toyclip_image__minilm/manifest.json", _truncate),
    ("world", "images.npy", _flip_byte),
    ("world", "manifest.json", _truncate),
    ("text", "embeddings.npy", _flip_byte),
    ("queries", "query_test/latents.npy", _flip_byte),
    ("generator", "unet/diffusion_pytorch_model.safetensors", _truncate),
    ("fisher", "fisher.safetensors", _flip_byte),
    ("teacher", "teacher_test.npz", _flip_byte),
    ("teacher", "influence_train.pkl", _truncate),
    ("teacher", "shards/test/000000.npz", _flip_byte),
    ("toyclip", "toyclip.pt", _truncate),
    ("student", "head.pt", _truncate),
    ("student", "index.faiss", _flip_byte),
    ("student", "stage.json", _truncate),
    ("teacher", "stage.json", lambda p: p.write_text("{not json")),
]


@pytest.mark.parametrize("stage,name,how", CORRUPTIONS,
                         ids=[f"{s}/{n}/{h.__name__}" for s, n, h in CORRUPTIONS])
def test_corrupted_cached_file_is_detected(capsys, tmp_path, finished, stage, name, how):
    run, overrides = _copy_run(finished, tmp_path)
    target = _stage_dir(run, stage, finished) / name
    assert target.is_file(), target
    how(target)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")
              if p.is_file() and p != target and p.parent != run}
    code, _, err = run_cli(capsys, "run", SMOKE, *overrides, "--no-progress")
    assert_clear(code, err, str(target) if stage == "student" and name == "stage.json"
                 else name.split("/")[-1], "attribution ")  # the file and the rebuild command
    # no finished work elsewhere is lost or rewritten
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*")
             if p.is_file() and p != target and p.parent != run}
    assert {p: t for p, t in after.items() if p in before} == before


def test_corrupted_file_is_detected_by_attribute(capsys, tmp_path, finished):
    run, overrides = _copy_run(finished, tmp_path)
    _flip_byte(_stage_dir(run, "features", finished) / "toyclip_image__minilm" / "items.npy")
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    code, _, err = run_cli(capsys, "attribute", SMOKE, *overrides, "--image", img,
                           "--prompt", "a red circle")
    assert_clear(code, err, "items.npy", "attribution features")


def test_teacher_merge_names_the_bad_shard(capsys, tmp_path, finished):
    run, overrides = _copy_run(finished, tmp_path)
    shard = _stage_dir(run, "teacher", finished) / "shards" / "train" / "000003.npz"
    _flip_byte(shard, 200)
    code, _, err = run_cli(capsys, "teacher", "merge", SMOKE, *overrides)
    assert_clear(code, err, "000003.npz", "teacher score")


# ---------------------------------------------------------------------------- the attribute CLI


def test_corrupt_last_checkpoint_falls_back_to_latest(smoke_run, tmp_path, capsys):
    from attribution.common.files import DataFileError
    from attribution.generator.train import resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(smoke_run.dir("generator") / "checkpoints", ckpts)
    assert resume_checkpoint(ckpts) == ckpts / "last.ckpt"
    _truncate(ckpts / "last.ckpt")
    assert resume_checkpoint(ckpts) == ckpts / "latest.ckpt"  # the intact copy is used
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and str(ckpts / "last.ckpt") in notes[0]
    assert notes[0].endswith(f"resuming from {ckpts / 'latest.ckpt'}")
    _flip_byte(ckpts / "latest.ckpt", 100)
    with pytest.raises(DataFileError, match=r"last\.ckpt.*latest\.ckpt"):
        resume_checkpoint(ckpts)


def test_a_resume_at_the_end_reports_the_loss_its_logs_recorded(tmp_path):
    """A generator resumed from its final checkpoint trains no step; its final loss is the last
    one an earlier attempt logged (the highest step over every log version), not NaN."""
    from attribution.generator.train import logged_loss

    for version, rows in {0: "step,train/loss\n9,0.5\n19,0.25\n", 1: "step,train/loss\n"}.items():
        (tmp_path / f"version_{version}").mkdir()
        (tmp_path / f"version_{version}" / "metrics.csv").write_text(rows)
    assert logged_loss(tmp_path) == 0.25
    assert logged_loss(tmp_path / "none") != logged_loss(tmp_path / "none")  # NaN: no logs


def test_checkpoint_that_would_run_code_is_refused(smoke_run, tmp_path):
    """A Lightning checkpoint is a pickle: a planted one must not execute on resume."""
    import torch

    from attribution.common.files import DataFileError
    from attribution.generator.train import resume_checkpoint

    marker = tmp_path / "pwned"
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"state_dict": {}, "loops": {}, "x": Exploit(marker)}, ckpts / "last.ckpt")
    with pytest.raises(DataFileError, match="last.ckpt"):
        resume_checkpoint(ckpts)
    assert not marker.exists()
