"""``runs/<name>/report.html``: the methods table, the figures and every test query's gallery
(the teacher's, the student's, the second teacher's and each baseline's top k), from the same
finished artifacts as ``report.md``; and the one sentence of reading both pages lead with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attribution import figures, gallery
from attribution.common.files import atomic_write_bytes
from attribution.config import planted_for, to_dict
from attribution.report_lead import reading
from attribution.student.deploy import student_test_scores


def _gallery_methods(pipe, metrics: dict) -> tuple[np.ndarray, list[gallery.Ranked]]:
    """(the teacher's test ranking, every method's Ranked: teacher, student, the second
    teacher, each baseline) of a finished run."""
    cfg, dirs = pipe.cfg, pipe.dirs()
    with np.load(dirs["teacher"] / "teacher_test.npz") as t:
        teacher, influence = t["rank"], t["influence"]
    scores = student_test_scores(cfg, dirs["features"], dirs["student"])
    methods = [gallery.Ranked("teacher", teacher, influence),
               gallery.Ranked("student", np.argsort(-scores, axis=1, kind="stable"), scores)]
    second = dirs["second_teacher"] / "teacher_test.npz"
    if cfg.second_teacher.enabled and second.is_file():
        with np.load(second) as t:
            methods.append(gallery.Ranked(cfg.second_teacher.name, t["rank"], t["influence"]))
    for path in [*sorted(dirs["student"].glob("rank_*.npy")),
                 *sorted(dirs["baselines"].glob("rank_*.npy"))]:
        name = path.stem[5:]
        methods.append(gallery.Ranked(figures.METHOD_NAMES.get(name, f"untuned {name}"),
                                      np.load(path)))
    return teacher, methods


def write_report_html(pipe, metrics: dict, k: int) -> Path:
    """``runs/<name>/report.html``: the methods table and figures, then every test query's
    gallery (``attribution/gallery.py``); thumbnails under ``report_files/``."""
    from attribution.data.dataset import CaptionedImageSet
    from attribution.data.queries import QuerySet
    from attribution.evaluation import query_types
    from attribution.teacher.evaluate import known_sources

    cfg, root = pipe.cfg, pipe.root
    world = CaptionedImageSet(pipe.dir("world"), verify=False)
    qs = QuerySet(pipe.dir("queries") / "query_test")
    teacher, methods = _gallery_methods(pipe, metrics)
    kinds = query_types(cfg, pipe.dir("queries"))
    kind = ["planted" if kinds and kinds["planted"][i] else "ordinary" for i in range(len(qs))]
    known = known_sources(world.attributes, qs.attributes or [{}] * len(qs),
                          [to_dict(p) for p in planted_for(cfg.world, "test")])
    files = root / "report_files"
    rows = []
    for i in range(len(qs)):
        gallery.save_thumbnail(qs.image(i), files / "queries" / f"{i}.png")
        rows.append(gallery.QueryRow(i, qs.captions[i], kind[i],
                                     f"report_files/queries/{i}.png",
                                     set().union(*known[i].values()) if known[i] else set()))
    for m in methods:
        for item in np.unique(m.rank[:, :k]):
            gallery.save_thumbnail(world.images[int(item)], files / "items" / f"{item}.png")
    captions = [c[0] for c in world.captions]
    table = [{**m, "second": (f"{metrics[f'second.{_prefix(m)}.mAP@{k}']:.3f}"
                              if f"second.{_prefix(m)}.mAP@{k}" in metrics else "—")}
             for m in sorted(figures.methods_of_run(metrics, k), key=lambda m: -m["quality"])]
    second = metrics.get("second.name") if f"second.student.mAP@{k}" in metrics else None
    intro = [f"<p>{_html_escape(reading(metrics, cfg.student.feature, k))}</p>",
             gallery.methods_table_html(table, k, second),
             '<p><img src="figures/quality_vs_throughput.png" alt="quality against throughput"'
             ' width="600"></p>',
             f"<h2>Every test query: the top {k} of each method</h2>"]
    body = gallery.gallery_rows(rows, methods, teacher, k, captions)
    path = root / "report.html"
    atomic_write_bytes(path, gallery.page(f"Attribution run {cfg.name}", intro, body,
                                          sorted(set(kind))).encode())
    gallery.write_json_sidecar(files / "gallery.json", rows, methods, k)
    return path


def _prefix(m: dict) -> str:
    return {"student": "student", "teacher": "teacher",
            "teacher_replicate": "teacher.self"}.get(m["key"], f"baseline.{m['key']}")


def _html_escape(text: str) -> str:
    """A markdown sentence as HTML: escaped, with its **bold** and `code` spans kept."""
    import html
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
