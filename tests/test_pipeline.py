import json
import subprocess
import sys

import numpy as np
import pytest

from attribution.cli import main
from attribution.common.files import DataFileError
from attribution.data.queries import QuerySet
from attribution.pipeline import Pipeline
from tests.conftest import SMOKE, smoke_config


def test_smoke_pipeline_end_to_end_and_cached(smoke_run, capsys):
    root = smoke_run.cfg.output_root
    assert main(["run", str(SMOKE), f"output_root={root}", "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "prompt fidelity" in first and "[  queries]" in first and "[  student]" in first
    assert "teacher known answers" in first
    q = smoke_run.dir("queries")
    cfg = smoke_run.cfg
    for split, n in (("train", cfg.queries.n_train), ("test", cfg.queries.n_test)):
        qs = QuerySet(q / f"query_{split}", need_embeddings=True)
        assert len(qs) == n
        assert qs.latents.shape == (n, 3, 16, 16) and qs.latents.dtype == np.float32
        assert qs.text_embeddings.shape == (n, cfg.text_encoder.max_length, 384)
        assert qs.image(n - 1).shape == (16, 16, 3)
        assert (q / f"grid_{split}.png").is_file()
    test = QuerySet(q / "query_test")
    assert test.attributes[0]["shape"] == "cross" and "cross" in test.captions[0]
    fid = json.loads((smoke_run.dir("fidelity") / "fidelity.json").read_text())
    assert set(fid["attributes"]) == {"shape", "colour", "position", "size", "texture",
                                      "background"}
    assert (smoke_run.root / "config.yaml").is_file()
    # everything is cached on a second run
    assert main(["run", str(SMOKE), f"output_root={root}", "--no-progress"]) == 0
    second = capsys.readouterr().out
    stage_lines = [ln for ln in second.splitlines()
                   if ln.startswith("[") and not ln.startswith("[   report]")]
    from attribution.stage_table import OPTIONAL, ORDER

    # every stage but the optional customization benchmark (abc.enabled is false), the second
    # teacher (second_teacher.enabled is false) and a COCO world's encoding
    assert len(stage_lines) == len(ORDER) - len(OPTIONAL) - 2
    assert not any("second_teacher" in ln or ln.startswith("[   encode]") for ln in stage_lines)
    assert all("cached" in ln for ln in stage_lines)
    assert f"[   report] {smoke_run.root / 'report.md'}" in second


def test_changed_setting_recomputes_only_downstream(smoke_run):
    other = Pipeline(smoke_config(smoke_run.cfg.output_root, "queries.sampling.guidance=2.0"))
    assert other.dir("generator") == smoke_run.dir("generator")
    assert other.dir("queries") != smoke_run.dir("queries")
    assert other.dir("fidelity") != smoke_run.dir("fidelity")


def test_missing_query_image_is_named(tmp_path):
    from attribution.data.queries import write_query_set

    imgs = np.zeros((2, 4, 4, 3), np.uint8)
    write_query_set(tmp_path, imgs, ["a", "b"], np.zeros((2, 3, 4, 4)), np.zeros((2, 5, 8)))
    (tmp_path / "images" / "1.png").unlink()
    with pytest.raises(DataFileError, match=r"images/1\.png"):
        QuerySet(tmp_path).image(1)
    (tmp_path / "captions.txt").write_text("only one\n")
    with pytest.raises(DataFileError, match="captions"):
        QuerySet(tmp_path)


def test_cli_errors_are_clean(tmp_path, capsys):
    assert main(["run", str(SMOKE), "generator.train.stpes=3"]) == 2
    assert "generator.train.steps" in capsys.readouterr().err
    assert main(["world", str(tmp_path / "missing.yaml")]) == 2


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "attribution", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("run", "world", "train-generator", "queries", "fidelity", "teacher", "toyclip",
                "features", "student", "attribute", "config"):
        assert cmd in out


def test_teacher_merge_command(smoke_run, capsys):
    smoke_run.run(["teacher"])
    root = smoke_run.cfg.output_root
    out_pkl = smoke_run.dir("teacher") / "influence_test.pkl"
    out_pkl.unlink()
    assert main(["teacher", "merge", str(SMOKE), f"output_root={root}"]) == 0
    assert "seconds_per_query" in json.loads(capsys.readouterr().out)
    assert out_pkl.is_file()


def test_counterfactual_runs_only_the_stages_its_methods_rank_from(tmp_path, monkeypatch):
    """Teacher against random needs the teacher stage, not the student or the baselines."""
    import attribution.counterfactual.run as cf

    pipe = Pipeline(smoke_config(tmp_path), progress=False, echo=lambda s: None)
    asked = []
    monkeypatch.setattr(pipe, "run", lambda stages: asked.append(stages))
    monkeypatch.setattr(cf, "run_counterfactual", lambda *a, **kw: None)
    pipe.run_counterfactual(["teacher", "random", "teacher@0.1"], [0], 3)
    pipe.run_counterfactual(["student", "random"], [0], 3)
    pipe.run_counterfactual(["dtrak", "teacher"], [0], 3)
    assert asked == [["teacher"], ["teacher", "student"], ["teacher", "baselines"]]


def test_a_run_folder_of_an_older_format_is_refused_with_one_line(tmp_path, capsys):
    """A folder whose stages an older version made (no format mark, or another format) is
    refused with one error line naming both fixes; ``--rebuild`` runs beside it and marks the
    folder, after which no flag is needed."""
    from attribution.config import FORMAT_VERSION
    from tests.conftest import run_cli

    run = tmp_path / "toy_smoke"
    (run / "world-0123456789ab").mkdir(parents=True)
    (run / "world-0123456789ab" / "stage.json").write_text("{}")
    code, _, err = run_cli(capsys, "world", SMOKE, f"output_root={tmp_path}", "--no-progress")
    assert code == 2 and err.startswith("error: ") and "older version" in err
    assert "--rebuild" in err and "delete" in err and "Traceback" not in err
    assert not (run / "format.json").exists()
    code, _, err = run_cli(capsys, "world", SMOKE, f"output_root={tmp_path}", "--no-progress",
                           "--rebuild")
    assert code == 0, err
    assert json.loads((run / "format.json").read_text()) == {"format": FORMAT_VERSION}
    assert (run / "world-0123456789ab" / "stage.json").is_file()  # the old files stay
    assert run_cli(capsys, "world", SMOKE, f"output_root={tmp_path}", "--no-progress")[0] == 0
    (run / "format.json").write_text(json.dumps({"format": FORMAT_VERSION - 1}))
    code, _, err = run_cli(capsys, "world", SMOKE, f"output_root={tmp_path}", "--no-progress")
    assert code == 2 and f"format {FORMAT_VERSION - 1}" in err


def test_a_device_the_machine_lacks_is_an_error_before_any_work(tmp_path, capsys, monkeypatch):
    """``device=cuda`` without a GPU stops with one line naming the fallback (``device=auto``)
    before a stage starts; with a GPU but faiss built without GPU support, the student's index
    names the ``gpu`` extra; ``auto`` quietly uses what there is."""
    import torch

    from attribution.common import devices
    from tests.conftest import run_cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the missing-device errors cannot happen")
    code, _, err = run_cli(capsys, "world", SMOKE, f"output_root={tmp_path}", "device=cuda",
                           "--no-progress")
    assert code == 2 and err.startswith("error: device=cuda") and "device=auto" in err
    assert not (tmp_path / "toy_smoke").exists()
    assert devices.faiss_on_gpu("auto") is False and devices.faiss_on_gpu("cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):  # faiss-cpu: the gpu extra is missing
        with pytest.raises(devices.DeviceError, match=r"gpu extra"):
            devices.faiss_on_gpu("cuda")
        assert devices.faiss_on_gpu("auto") is False
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: two is refused
    with pytest.raises(devices.DeviceError, match=r"teacher.devices=2, but this machine has 1"):
        devices.check_device_counts("cuda", {"student.devices": 1, "teacher.devices": 2})
    devices.check_device_counts("cpu", {"teacher.devices": 2})  # CPU processes: allowed


def test_one_writer_per_run_folder_with_two_real_processes(tmp_path):
    """A second process on a run folder that one is working in is refused with one line
    naming the first's pid, before any work; once the first is killed (its lock dies with it)
    the folder is taken over."""
    import os
    import signal
    import time

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from attribution.common.files import FolderLock\n"
         f"with FolderLock({str(tmp_path / 'toy_smoke')!r}):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cmd = [sys.executable, "-m", "attribution", "world", str(SMOKE),
               f"output_root={tmp_path}", "--no-progress"]
        second = subprocess.run(cmd, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith("error: ") and f"pid {holder.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert not list((tmp_path / "toy_smoke").glob("world-*"))  # no work began
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        time.sleep(0.2)
        third = subprocess.run(cmd, capture_output=True, text=True)
        assert third.returncode == 0, third.stderr  # the dead holder's lock is gone
        assert list((tmp_path / "toy_smoke").glob("world-*/stage.json"))
    finally:
        holder.kill()
