"""What each method blames, to look at: per test query, the query image and prompt beside the
top k of the teacher, the student and every baseline — thumbnails with rank and score, known
sources (a planted concept's items) and items the teacher's top k shares marked, and each
method's AP for that query.  ``report.html`` (the report stage) and ``attribute --html`` (one
query) are written from the same pieces; plain HTML, one small script to filter by query kind
and sort by the student's AP, images as PNG files beside the page (``report_files/``).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from attribution.callbacks import ap_at_k

THUMB = 4  # thumbnails are the items upscaled 4x (nearest): 16 px toy images -> 64 px


@dataclass
class Ranked:
    """One method's ranking of the test queries: ids int (Q, >= k), best first; ``scores``
    float (Q, N) when the method has scores worth showing (else ranks alone)."""

    name: str
    rank: np.ndarray
    scores: np.ndarray | None = None
    note: str = ""


@dataclass
class QueryRow:
    index: int
    prompt: str
    kind: str
    image: str  # path relative to the page
    known: set[int] = field(default_factory=set)


def save_thumbnail(image: np.ndarray, path: Path) -> None:
    """uint8 (H, W, 3) -> a PNG upscaled ``THUMB`` times (written once)."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    img.resize((img.width * THUMB, img.height * THUMB), Image.NEAREST).save(path)


def _cell(item: int, pos: int, score: float | None, known: bool, shared: bool,
          caption: str, files: str) -> str:
    marks = (" known" if known else "") + (" shared" if shared else "")
    tip = html.escape(f"item {item}: {caption}", quote=True)
    value = "" if score is None else f" · {score:.3g}"
    return (f'<figure class="item{marks}" title="{tip}"><img src="{files}/items/{item}.png"'
            f' alt="item {item}"><figcaption>#{pos + 1}{value}</figcaption></figure>')


def gallery_rows(queries: list[QueryRow], methods: list[Ranked], teacher: np.ndarray | None,
                 k: int, captions: list[str], files: str = "report_files") -> list[str]:
    """HTML of one block per query: its image and prompt, then a row per method (thumbnails
    under ``files``/items/, relative to the page; AP only where a teacher ranking is known)."""
    aps = {m.name: ap_at_k(m.rank, teacher, k) if teacher is not None else None
           for m in methods}
    out = []
    for qi, q in enumerate(queries):
        top_teacher = set(teacher[qi, :k].tolist()) if teacher is not None else set()
        student_ap = aps.get("student")
        sort_key = f"{student_ap[qi]:.4f}" if student_ap is not None else "0"
        out.append(f'<section class="query" data-kind="{q.kind}" data-ap="{sort_key}">'
                   f'<header><img class="query-image" src="{q.image}" alt="query {q.index}">'
                   f'<div><b>query {q.index}</b> <span class="kind">{q.kind}</span><br>'
                   f'{html.escape(q.prompt)}</div></header>')
        for m in methods:
            ids = m.rank[qi, :k].tolist()
            ap = aps[m.name]
            head = (f'<div class="method"><div class="name">{html.escape(m.name)}'
                    + (f'<br><span class="ap">AP@{k} {ap[qi]:.2f}</span>' if ap is not None
                       else "") + "</div>")
            cells = "".join(_cell(i, pos, None if m.scores is None else float(m.scores[qi, i]),
                                  i in q.known, i in top_teacher and m.name != "teacher",
                                  captions[i], files) for pos, i in enumerate(ids))
            out.append(head + cells + "</div>")
        out.append("</section>")
    return out


STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc;
padding: 3px 8px; text-align: right; } td:first-child, th:first-child { text-align: left; }
.query { border-top: 2px solid #888; margin-top: 1em; padding-top: .5em; }
.query header { display: flex; gap: 1em; align-items: center; }
.query-image { width: 96px; image-rendering: pixelated; border: 1px solid #444; }
.kind { background: #eee; padding: 0 .4em; border-radius: 3px; font-size: 80%; }
.method { display: flex; align-items: center; gap: 4px; margin: 3px 0; }
.method .name { width: 190px; font-size: 80%; } .ap { color: #555; }
.item { margin: 0; text-align: center; font-size: 65%; border: 3px solid transparent; }
.item img { width: 56px; image-rendering: pixelated; display: block; }
.item.known { border-color: #d62728; } .item.shared { background: #cfe8ff; }
.controls { position: sticky; top: 0; background: white; padding: .5em 0; }
"""

SCRIPT = """
function show() {
  const kind = document.getElementById('kind').value;
  const order = document.getElementById('order').value;
  const box = document.getElementById('gallery');
  const qs = Array.from(box.querySelectorAll('section.query'));
  qs.forEach(q => { q.style.display = (kind === 'all' || q.dataset.kind === kind) ? '' : 'none'; });
  if (order !== 'index') {
    qs.sort((a, b) => (parseFloat(a.dataset.ap) - parseFloat(b.dataset.ap)) *
                      (order === 'ap-asc' ? 1 : -1));
    qs.forEach(q => box.appendChild(q));
  }
}
document.getElementById('kind').addEventListener('change', show);
document.getElementById('order').addEventListener('change', show);
"""


def page(title: str, intro: list[str], rows: list[str], kinds: list[str]) -> str:
    """The whole page: title, ``intro`` (HTML blocks: the methods table, figures), the
    controls and the gallery."""
    options = "".join(f'<option value="{html.escape(k)}">{html.escape(k)}</option>'
                      for k in kinds)
    controls = ('<div class="controls">query kind <select id="kind"><option value="all">all'
                f'</option>{options}</select> order <select id="order"><option value="index">'
                'as run</option><option value="ap-asc">student AP, lowest first</option>'
                '<option value="ap-desc">student AP, highest first</option></select>'
                ' <span style="font-size:80%">red frame: a known source (the planted '
                "concept's items); blue: also in the teacher's top k</span></div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "".join(intro) + controls
            + '<div id="gallery">' + "".join(rows) + f"</div><script>{SCRIPT}</script>"
            "</body></html>")


def methods_table_html(rows: list[dict], k: int, second: str | None) -> str:
    """The methods table (``figures.methods_of_run`` rows) as HTML."""
    head = ["method", f"mAP@{k} (s.e.)"] + ([f"vs {second}"] if second else []) + [
        "queries/s"]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in [
            r["method"], f"{r['quality']:.3f} ({r['stderr']:.3f})",
            *([r["second"]] if second else []), f"{r['qps']:.4g}"]) + "</tr>" for r in rows)
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + body + "</table>")


def write_json_sidecar(path: Path, queries: list[QueryRow], methods: list[Ranked],
                       k: int) -> None:
    """The gallery's content as data (query, method, top-k ids): what tests and tools read."""
    data = [{"query": q.index, "kind": q.kind, "known": sorted(q.known),
             "methods": {m.name: m.rank[qi, :k].tolist() for m in methods}}
            for qi, q in enumerate(queries)]
    path.write_text(json.dumps(data))
