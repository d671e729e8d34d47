"""``report.html``: every test query's top items per method, images that load, known sources
marked — checked by structure, and in a real headless browser where one is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.sections, self.methods, self.known = [], [], 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "section":
            self.sections.append(a)
        if tag == "div" and a.get("class") == "method":
            self.methods += 1
        if tag == "figure" and "known" in a.get("class", "").split():
            self.known += 1


@pytest.fixture(scope="module")
def page(finished):
    from attribution.report import write_report

    write_report(finished)
    path = finished.root / "report.html"
    parsed = _Page()
    parsed.feed(path.read_text())
    return finished, path, parsed


def test_report_html_shows_every_query_and_method_with_images_that_exist(page):
    pipe, path, parsed = page
    cfg = pipe.cfg
    # teacher, student, each baseline and the whitened start (ranked by the student stage)
    n_methods = (2 + len(list(pipe.dir("baselines").glob("rank_*.npy")))
                 + (pipe.dir("student") / "rank_whitened.npy").is_file())
    assert len(parsed.sections) == cfg.queries.n_test
    assert parsed.methods == cfg.queries.n_test * n_methods
    missing = [src for src in parsed.images if not (path.parent / src).is_file()]
    assert not missing, missing[:5]
    kinds = [s["data-kind"] for s in parsed.sections]
    from attribution.config import planted_for

    assert kinds.count("planted") == cfg.queries.planted_test * len(planted_for(cfg.world,
                                                                                "test"))
    # the gallery's data: the teacher's row is the teacher's ranking, known sources marked
    data = json.loads((path.parent / "report_files" / "gallery.json").read_text())
    with np.load(pipe.dir("teacher") / "teacher_test.npz") as t:
        assert data[0]["methods"]["teacher"] == t["rank"][0, :5].tolist()
    planted = [d for d in data if d["kind"] == "planted"]
    assert planted and all(d["known"] for d in planted)
    shown_known = sum(len(set(ids) & set(d["known"])) for d in planted
                      for ids in d["methods"].values())
    assert parsed.known == shown_known > 0


def test_report_md_leads_with_the_reading_and_the_methods_table(page):
    pipe, _, _ = page
    text = (pipe.root / "report.md").read_text()
    reading = text.index("**Reading.**")
    table = text.index("## Methods on the same test queries")
    appendix = text.index("## Appendix: stages and every figure")
    assert reading < table < appendix
    assert "| metric | value |" in text[appendix:] and "| metric | value |" not in text[:appendix]
    assert "[report.html](report.html)" in text


def test_report_html_loads_in_a_headless_browser(page, tmp_path):
    """Every image loads and the script raises no error, in Chromium (skipped where none is
    installed: `apt-get install chromium`); a screenshot is saved beside the page."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium) - the structure "
                    "test above still checks every image file")
    pipe, path, parsed = page
    probe = path.parent / "report_probe.html"
    check = ("<script>window.addEventListener('load', () => {"
             "const bad = Array.from(document.images).filter(i => !i.complete || "
             "i.naturalWidth === 0).length;"
             "document.title = 'images:' + document.images.length + ' broken:' + bad + "
             "' errors:' + (window.__errors || 0); });"
             "window.addEventListener('error', () => { window.__errors = "
             "(window.__errors || 0) + 1; });</script>")
    probe.write_text(path.read_text().replace("<head>", "<head>" + check, 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = dom.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    assert title == f"images:{len(parsed.images)} broken:0 errors:0", title
    shot = path.parent / "report_screenshot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1400,1000",
                    path.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 1000


def test_attribute_html_is_the_gallery_for_one_query(page, capsys, tmp_path):
    """``attribute --html``: the query and the student's top k beside the untuned features',
    every image on disk; the student's row is the ranking the command prints."""
    from PIL import Image

    from tests.conftest import SMOKE, run_cli

    pipe, _, _ = page
    img = tmp_path / "q.png"
    Image.new("RGB", (16, 16), (30, 30, 200)).save(img)
    out = tmp_path / "one.html"
    code, text, err = run_cli(capsys, "attribute", SMOKE, f"output_root={pipe.cfg.output_root}",
                              "--image", img, "--prompt", "a blue square", "-k", "4",
                              "--html", out)
    assert code == 0, err
    parsed = _Page()
    parsed.feed(out.read_text())
    assert len(parsed.sections) == 1 and parsed.methods == 2
    assert all((out.parent / src).is_file() for src in parsed.images)
    printed = [int(line.split()[1]) for line in text.splitlines()[1:5]]
    student_row = out.read_text().split('<div class="method">')[1]
    assert [f"items/{i}.png" in student_row for i in printed] == [True] * 4


def test_wandb_runs_carry_the_gallery_table(smoke_run, tmp_path):
    """An offline W&B student logs a table of the first test queries (image, prompt, AP, the
    student's and the teacher's top k), what a sweep's runs are compared by in W&B."""
    from attribution.pipeline import Pipeline
    from tests.conftest import smoke_config

    smoke_run.run(["features", "teacher"])
    cfg = smoke_config(tmp_path, "student.logger=wandb_offline", "student.epochs=1")
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    pipe.check_format()
    for stage in pipe.ancestors("student"):  # the session's stages; the student trains here
        pipe.dir(stage).symlink_to(smoke_run.dir(stage), target_is_directory=True)
    assert not pipe.run(["student"])["student"].cached
    tables = list(pipe.dir("student").glob("wandb/offline-run-*/files/media/table/"
                                          "test_gallery_*.table.json"))
    assert tables, "no gallery table in the offline run"
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["query", "image", "prompt"]
    assert len(table["data"]) == min(8, cfg.queries.n_test)
