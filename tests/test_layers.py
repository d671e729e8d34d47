"""The package's layering (``[tool.importlinter]`` in pyproject.toml) holds: a change that makes a
lower layer import a higher one, a library module import the orchestration, or two sibling
modules import each other in a circle fails here."""

import ast
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
    assert "5 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module, line", [
    ("attribution/student/head.py", "from attribution.pipeline import Pipeline  # noqa"),
    ("attribution/common/seeds.py", "import attribution.config  # noqa"),
    ("attribution/data/dataset.py", "import attribution.teacher.run  # noqa"),
    ("attribution/teacher/scorer.py", "import attribution.studies.scoring  # noqa"),
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


ORCHESTRATION = {"pipeline.py", "stage_table.py", "sweeps.py", "cli.py", "report.py",
                 "report_html.py"}


def test_no_library_function_takes_the_pipeline():
    """Stages and library functions receive the config and stage folders, never the scheduler:
    no function outside the orchestration has a ``pipe``/``pipeline`` parameter."""
    offenders = []
    for path in sorted((ROOT / "attribution").rglob("*.py")):
        if path.parent.name == "attribution" and path.name in ORCHESTRATION:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names = {a.arg for a in [*node.args.args, *node.args.kwonlyargs]}
                if names & {"pipe", "pipeline"}:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not offenders, offenders


def test_no_file_is_over_350_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*ROOT.glob("attribution/**/*.py"),
                                                   *ROOT.glob("tests/**/*.py"),
                                                   *ROOT.glob("benchmarks/*.py")]
            if (n := len(p.read_text().splitlines())) > 360}
    assert not long, long


def test_no_library_function_is_over_60_lines():
    """A function a reader must hold in mind at once stays short (docstring included)."""
    long = []
    for path in ROOT.glob("attribution/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                    (n := node.end_lineno - node.lineno + 1) > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert not long, long
