"""Shared fixtures: the real smoke config, shrunk further, writing only under tmp paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attribution.config import load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "experiment" / "toy_smoke.yaml"


def smoke_config(output_root: Path, *overrides: str):
    """The shipped smoke experiment with its outputs under ``output_root``."""
    return load_config(SMOKE, [f"output_root={output_root}", *overrides])


def tiny_open_clip(folder: Path, name: str):
    """Register a tiny open_clip config ``name``, save random weights; -> (model, weights path)."""
    import json

    import open_clip
    import torch

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                          "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    model = open_clip.create_model(name).eval()
    torch.save(model.state_dict(), folder / "w.pt")
    return model, folder / "w.pt"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Run the smoke pipeline's world/text/generator stages once for the whole session."""
    from attribution.pipeline import Pipeline

    root = tmp_path_factory.mktemp("smoke_runs")
    cfg = smoke_config(root)
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    pipe.run(["generator"])
    return pipe


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``attribution ARGV`` in-process: (exit code, stdout, stderr)."""
    from attribution.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clear(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"


@pytest.fixture(scope="session")
def finished(smoke_run):
    """The smoke pipeline run to the end (its generator is the session's)."""
    smoke_run.run()
    return smoke_run


class Exploit:
    """Unpickling this would run a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
