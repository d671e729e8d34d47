"""Killed for real (SIGKILL, mid-stage), rerun, and compared byte for byte with a run that was
never interrupted: the teacher (resumes from its per-query shards) and the student (restarts its
unfinished stage; nothing of the killed attempt leaks into the result)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SMOKE

# Wall-clock figures differ between any two runs, and `queries_scored` counts what THIS
# invocation scored (the resumed one scores only the rest); every other figure must be equal.
TIMING = ("seconds", "per_second", "queries_scored")


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "attribution.cli", *argv, "--no-progress"]


def _finish(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_when(argv: list[str], ready, timeout: float = 300) -> None:
    """Start ``argv``, SIGKILL it as soon as ``ready()`` holds (it must not have finished)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    start = time.time()
    try:
        while not ready():
            assert proc.poll() is None, "the stage ended before it could be killed"
            assert time.time() - start < timeout, "the stage never reached the kill point"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _two_copies(smoke_run, tmp_path: Path) -> tuple[Path, Path]:
    src = Path(smoke_run.cfg.output_root)
    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    return a, b


def _same_bytes(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _same_figures(a: dict, b: dict) -> None:
    for key, value in a.items():
        if any(t in key for t in TIMING):
            continue
        if isinstance(value, dict):
            _same_figures(value, b[key])
        else:
            assert b[key] == value, key


def test_teacher_killed_mid_scoring_resumes_byte_identical(smoke_run, tmp_path):
    smoke_run.run(["fisher", "queries"])  # the stages before the one that is killed
    a, b = _two_copies(smoke_run, tmp_path)
    teacher = smoke_run.dir("teacher").name
    for copy in (a, b):  # other tests may have finished the teacher in the shared smoke run
        shutil.rmtree(copy / smoke_run.cfg.name / teacher, ignore_errors=True)
    _finish(_cli("teacher", "score", str(SMOKE), f"output_root={a}"))

    shards = b / smoke_run.cfg.name / teacher / "shards"
    _kill_when(_cli("teacher", "score", str(SMOKE), f"output_root={b}"),
               lambda: len(list(shards.glob("*/*.npz"))) >= 2)
    done = len(list(shards.glob("*/*.npz")))
    assert not (b / smoke_run.cfg.name / teacher / "stage.json").exists()
    assert 2 <= done < 14, done  # killed part-way (8 train + 6 test queries)
    _finish(_cli("teacher", "score", str(SMOKE), f"output_root={b}"))

    ta, tb = a / smoke_run.cfg.name / teacher, b / smoke_run.cfg.name / teacher
    _same_bytes(ta, tb, ["influence_train.pkl", "influence_test.pkl", "teacher_train.npz",
                         "teacher_test.npz", "candidates_train.npy", "base_losses.npy",
                         "known_answers.json"])
    for shard in sorted(ta.glob("shards/*/*.npz")):
        with np.load(shard) as x, np.load(tb / shard.relative_to(ta)) as y:
            for key in ("candidates", "influence"):
                assert x[key].tobytes() == y[key].tobytes(), shard
    sa = json.loads((ta / "stage.json").read_text())
    sb = json.loads((tb / "stage.json").read_text())
    _same_figures(sa["summary"], sb["summary"])


def test_student_killed_mid_training_reruns_byte_identical(smoke_run, tmp_path):
    smoke_run.run(["features", "teacher"])
    a, b = _two_copies(smoke_run, tmp_path)
    longer = ["student.epochs=300", "student.logger=csv"]  # long enough to be killed in
    from attribution.pipeline import Pipeline
    from tests.conftest import smoke_config

    student = Pipeline(smoke_config(a, *longer)).dir("student").name
    for copy in (a, b):
        shutil.rmtree(copy / smoke_run.cfg.name / student, ignore_errors=True)
    _finish(_cli("student", str(SMOKE), f"output_root={a}", *longer))

    sdir = b / smoke_run.cfg.name / student
    _kill_when(_cli("student", str(SMOKE), f"output_root={b}", *longer),
               lambda: (sdir / "checkpoints" / "last.ckpt").is_file())
    assert not (sdir / "stage.json").exists() and not (sdir / "head.pt").exists()
    _finish(_cli("student", str(SMOKE), f"output_root={b}", *longer))

    sa = a / smoke_run.cfg.name / student
    _same_bytes(sa, sdir, ["head.pt", "head.json", "index.faiss"])
    _same_figures(json.loads((sa / "metrics.json").read_text()),
                  json.loads((sdir / "metrics.json").read_text()))


if sys.platform == "win32":  # SIGKILL is POSIX
    pytestmark = pytest.mark.skip("needs POSIX signals")


def _terminate_when(argv: list[str], ready, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``argv``, send SIGTERM once ``ready()`` holds; -> its exit code and stderr (it
    must stop within 60 s: within a batch, not at the end of its stage)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    start = time.time()
    try:
        while not ready():
            assert proc.poll() is None, "the stage ended before the signal"
            assert time.time() - start < timeout, "the stage never reached the signal point"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, "", err)


# the student's and the generator's stop share the Lightning path the teacher's takes: they
# run with -m slow (the suite's budget)
@pytest.mark.parametrize("stage", [pytest.param("generator", marks=pytest.mark.slow), "teacher",
                                   pytest.param("student", marks=pytest.mark.slow)])
def test_sigterm_stops_a_stage_with_143_and_it_resumes(smoke_run, tmp_path, stage):
    """SIGTERM (a scheduler's stop) ends the stage within a batch with exit code 143 and one line
    saying how to resume; no completion record is written, what finished stays, and the same
    command then finishes the stage."""
    smoke_run.run(["features", "teacher"] if stage == "student" else ["fisher", "queries"])
    root = tmp_path / "copy"
    shutil.copytree(Path(smoke_run.cfg.output_root), root)
    longer = {"generator": ["generator.train.steps=3000"],
              "teacher": [], "student": ["student.epochs=300", "student.logger=csv"]}[stage]
    from attribution.pipeline import Pipeline
    from tests.conftest import smoke_config

    folder = Pipeline(smoke_config(root, *longer)).dir(stage)
    shutil.rmtree(folder, ignore_errors=True)
    command = {"generator": "train-generator", "teacher": "teacher", "student": "student"}
    argv = _cli(*command[stage].split(), *(["score"] if stage == "teacher" else []),
                str(SMOKE), f"output_root={root}", *longer)
    ready = {"generator": lambda: list(folder.glob("**/*.ckpt")),
             "teacher": lambda: len(list(folder.glob("shards/*/*.npz"))) >= 2,
             "student": lambda: (folder / "checkpoints" / "last.ckpt").is_file()}[stage]
    stopped = _terminate_when(argv, ready)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    lines = [ln for ln in stopped.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("terminated (SIGTERM)") and "Traceback" not in stopped.stderr
    assert not (folder / "stage.json").exists()
    if stage == "teacher":
        kept = len(list(folder.glob("shards/*/*.npz")))
        assert kept >= 2
    if stage != "generator":  # (a 3,000-step generator is not worth finishing here)
        _finish(argv)
        assert (folder / "stage.json").is_file()
