"""Bad images and arguments of `attribution attribute`; valid-but-odd images converted with a
one-line notice; the exit code and stderr a shell sees.

Every case is ONE clear error line (exit code 2) that names the key or the file, before any
stage spends work, and no traceback.  The cases run through ``attribution.cli.main`` in-process
(a traceback would be an exception escaping ``main`` and fail the test).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, SMOKE, assert_clear, run_cli


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _make_image(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.png"
    if case == "text":
        path.write_text("this is not an image\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbled":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    elif case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            path)
        path.write_bytes(path.read_bytes()[:400])
    elif case == "bomb":
        _png_claiming(path, 40_000, 40_000)
    elif case == "folder":
        path = tmp_path / "a_folder.png"
        path.mkdir()
    elif case == "missing":
        path = tmp_path / "missing.png"
    return path


@pytest.mark.parametrize("case", ["text", "empty", "garbled", "truncated", "bomb", "folder",
                                  "missing"])
def test_attribute_refuses_bad_images(capsys, tmp_path, finished, case):
    img = _make_image(tmp_path, case)
    code, _, err = run_cli(capsys, "attribute", SMOKE, f"output_root={finished.cfg.output_root}",
                           "--image", img, "--prompt", "a red circle")
    assert_clear(code, err, img.name)


@pytest.mark.parametrize("args,named", [
    (["-k", "0"], "-k"), (["-k", "-3"], "-k"), (["--prompt", "  "], "--prompt"),
    (["--grid", "{tmp}/no/such/folder/g.png"], "does not exist"),
    (["--grid", "{tmp}/grid.txt"], ".png"),
    (["--grid", "{tmp}/q.png"], "query image itself"),
], ids=["k0", "k-negative", "empty-prompt", "grid-folder", "grid-suffix", "grid-is-image"])
def test_attribute_refuses_bad_arguments(capsys, tmp_path, finished, args, named):
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    prompt = [] if "--prompt" in args else ["--prompt", "a red circle"]
    code, _, err = run_cli(capsys, "attribute", SMOKE, f"output_root={finished.cfg.output_root}",
                           "--image", img, *prompt, *args)
    assert_clear(code, err, named)
    assert not (tmp_path / "no").exists()  # no folder created anywhere
    assert Image.open(img).size == (16, 16)  # the query image is untouched


@pytest.mark.parametrize("case,notice", [
    ("rgba", "alpha"), ("gray", "converted to RGB"), ("tiny", "upsampled"),
    ("huge", "downsampled"), ("wide", "center square"), ("palette", "converted to RGB"),
])
def test_attribute_converts_odd_images_with_a_notice(capsys, tmp_path, finished, case, notice):
    path = tmp_path / f"{case}.png"
    make = {"rgba": lambda: Image.new("RGBA", (16, 16), (200, 30, 30, 128)),
            "gray": lambda: Image.new("L", (16, 16), 128),
            "tiny": lambda: Image.new("RGB", (1, 1), (200, 30, 30)),
            "huge": lambda: Image.new("L", (9000, 9000), 90),
            "wide": lambda: Image.new("RGB", (40, 16), (200, 30, 30)),
            "palette": lambda: Image.new("RGB", (16, 16), (200, 30, 30)).convert("P")}
    make[case]().save(path, compress_level=1)
    code, out, err = run_cli(capsys, "attribute", SMOKE,
                             f"output_root={finished.cfg.output_root}", "--image", path,
                             "--prompt", "a red circle", "-k", "3")
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if ln.startswith("note: ")]
    assert out.startswith("note: ") and 1 <= len(notes) <= 2
    assert any(notice in ln and path.name in ln for ln in notes), notes


def test_attribute_k_above_items_is_capped_with_a_notice(capsys, tmp_path, finished):
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    code, out, _ = run_cli(capsys, "attribute", SMOKE, f"output_root={finished.cfg.output_root}",
                           "--image", img, "--prompt", "a red circle", "-k", "100000")
    assert code == 0 and "exceeds the 200 training items" in out


def test_attribute_before_the_student_exists(capsys, tmp_path):
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16)).save(img)
    code, _, err = run_cli(capsys, "attribute", SMOKE, f"output_root={tmp_path / 'runs'}",
                           "--image", img, "--prompt", "a red circle")
    assert_clear(code, err, "student", "attribution student")


# ------------------------------------------------------------------- as a shell sees it
@pytest.mark.parametrize("argv,named", [
    (["config", str(SMOKE), "student.lr=-1"], "student.lr"),
    (["run", str(SMOKE), "features.spaces=[pixels,foo]"], "features.spaces"),
], ids=["config", "run"])
def test_subprocess_exit_code_and_stderr(tmp_path, argv, named):
    proc = subprocess.run([sys.executable, "-m", "attribution.cli", *argv,
                           f"output_root={tmp_path}"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert named in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------- generator checkpoints
