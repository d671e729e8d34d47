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
    from attribution.pipeline import OPTIONAL, ORDER

    # every stage but the optional customization benchmark (abc.enabled is false)
    assert len(stage_lines) == len(ORDER) - len(OPTIONAL)
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
