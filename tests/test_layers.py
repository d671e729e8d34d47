"""The package's layering (``[tool.importlinter]`` in pyproject.toml) holds: a change that makes a
lower layer import a higher one, a library module import the orchestration, or two sibling
modules import each other in a circle fails here."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([exe, "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)})


def test_import_contracts_are_kept():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "4 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module, line", [
    ("attribution/student/head.py", "from attribution.pipeline import Pipeline  # noqa"),
    ("attribution/common/seeds.py", "import attribution.config  # noqa"),
    ("attribution/data/dataset.py", "import attribution.teacher.run  # noqa"),
])
def test_a_wrong_way_import_breaks_the_contracts(tmp_path, module, line):
    """The check can fail: the same tree with one upward import added is refused."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "attribution", tree / "attribution")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    path = tree / module
    path.write_text(path.read_text() + "\n" + line + "\n")
    res = _lint(tree)
    assert res.returncode != 0 and "BROKEN" in res.stdout, res.stdout[-2000:]
