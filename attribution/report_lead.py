"""What both report pages lead with: one sentence of reading and the methods table (each
method's mAP@k ± standard error beside its floor and ceiling, per query kind, and against the
second teacher when the run has one)."""

from __future__ import annotations

import math

from attribution import figures


def reading(metrics: dict, feature: str, k: int) -> str:
    """One sentence: the student beside its floor(s) and the ceiling, at mAP@k."""
    def fig(key: str) -> str:
        v = metrics.get(key)
        return "—" if v is None else f"{v:.3f} ± {metrics.get(key + '_stderr', 0.0):.3f}"

    student = metrics.get(f"student.mAP@{k}", float("nan"))

    def side(key: str, low: bool) -> str:  # where the student stands against a figure
        v = metrics.get(key, float("nan"))
        return ("above" if student > v else "not above") if low else (
            "below" if student < v else "not below")

    floor = f"baseline.{feature}.mAP@{k}"
    text = (f"**Reading.** The student ranks the training items at mAP@{k} "
            f"{fig(f'student.mAP@{k}')} against the teacher's top {k} (± standard error over "
            f"the test queries): {side(floor, True)} its untuned `{feature}` features "
            f"({fig(floor)})")
    if f"baseline.whitened.mAP@{k}" in metrics:
        text += (f", {side(f'baseline.whitened.mAP@{k}', True)} the same features whitened, "
                 f"the head's start ({fig(f'baseline.whitened.mAP@{k}')})")
    if f"teacher.self_mAP@{k}" in metrics:
        text += (f", {side(f'teacher.self_mAP@{k}', False)} the ceiling, the teacher rescored "
                 f"with fresh noise ({fig(f'teacher.self_mAP@{k}')})")
    return text + "."


def methods_table(metrics: dict, k: int) -> list[str]:
    planted = sorted({key.split(".")[-1] for key in metrics
                      if key.startswith("baseline.") and key.endswith("_recall@10")})
    types = [t for t in ("ordinary", "planted") if f"student.{t}.mAP@{k}" in metrics]
    second = metrics.get("second.name") if f"second.student.mAP@{k}" in metrics else None
    L = ["## Methods on the same test queries", "",
         f"| method | mAP@{k} (s.e.) | " + "".join(f"{t} mAP@{k} | " for t in types)
         + (f"mAP@{k} vs {second} (s.e.) | " if second else "")
         + "queries/s | storage | "
         + " | ".join(p.replace("_recall@10", " recall@10") for p in planted) + " |",
         "|---|---|" + "---|" * len(types) + "---|" * bool(second) + "---:|---:|"
         + "---:|" * len(planted)]
    for m in sorted(figures.methods_of_run(metrics, k), key=lambda m: -m["quality"]):
        prefix = {"student": "student", "teacher": "teacher",
                  "teacher_replicate": "teacher.self"}.get(m["key"], f"baseline.{m['key']}")
        rec = [metrics.get(f"{prefix}.{p}") for p in planted]
        by_type = "".join(
            "— | " if metrics.get(f"{prefix}.{t}.mAP@{k}") is None else
            f"{metrics[f'{prefix}.{t}.mAP@{k}']:.3f} ({metrics[f'{prefix}.{t}.mAP@{k}_stderr']:.3f}) | "
            for t in types)
        vs = metrics.get(f"second.{prefix}.mAP@{k}") if second else None
        vs_cell = ("" if not second else "— | " if vs is None else
                   f"{vs:.3f} ({metrics[f'second.{prefix}.mAP@{k}_stderr']:.3f}) | ")
        L.append(f"| {m['method']} | {m['quality']:.3f} ({m['stderr']:.3f}) | {by_type}"
                 f"{vs_cell}{m['qps']:.4g} | {figures._human(m['storage'])} | "
                 + " | ".join(_recall_cell(r, metrics.get(f"{prefix}.{p}_stderr"))
                              for r, p in zip(rec, planted)) + " |")
    ceiling = metrics.get(f"teacher.self_mAP@{k}")
    if ceiling is not None:
        se = metrics.get(f"teacher.self_mAP@{k}_stderr", 0.0)
        near = [m["method"] for m in figures.methods_of_run(metrics, k)
                if m["key"] not in ("teacher", "teacher_replicate")
                and m["quality"] + 2 * math.hypot(m["stderr"], se) >= ceiling]
        L += ["", f"**Ceiling.** The teacher rescored on "
              f"{metrics.get('teacher.self_queries', '?')} test queries with fresh noise (new "
              f"query draws and item noise) agrees with itself at mAP@{k} {ceiling:.3f} "
              f"(s.e. {se:.3f}): no method can be expected above it. "
              + "".join(f"On {t} queries alone: {metrics[f'teacher.self.{t}.mAP@{k}']:.3f} "
                        f"(s.e. {metrics[f'teacher.self.{t}.mAP@{k}_stderr']:.3f}). "
                        for t in types if f"teacher.self.{t}.mAP@{k}" in metrics)
              + (f"Within two standard errors of it: {', '.join(near)}." if near else
                 "No method is within two standard errors of it.")]
    if second:
        L += ["", _second_teacher_line(metrics, k, types)]
    recall = metrics.get("teacher.curation_recall@10")
    if recall is not None:
        L += ["", f"**Curation.** Of the teacher's full-set top 10 for "
              f"{metrics.get('teacher.curation_queries', '?')} training queries scored over every "
              f"item, {recall:.2f} (s.e. {metrics.get('teacher.curation_recall@10_stderr', 0):.2f})"
              f" lies inside their stage-1 K-sets (`teacher.curation_recall@10`)."]
    if not (planted or types):  # a world without planted concepts (folder, COCO)
        return L + [""]
    return L + ["", "Known-answer recall@10 (s.e. over the concept's queries): the share of the "
                "planted items found in the top 10 "
                "by the test queries that prompt the planted concept (chance = 10/N). "
                "*ordinary* / *planted*: the same mAP over the test queries whose prompt names "
                "no planted concept / a planted concept.", ""]


def _second_teacher_line(metrics: dict, k: int, types: list[str]) -> str:
    """The two teachers against each other, overall and per query type."""
    def pair(key: str) -> str:
        return f"{metrics[key]:.3f} (s.e. {metrics[key + '_stderr']:.3f})"

    kinds = "".join(f" On {t} queries: {pair(f'second.teacher.{t}.mAP@{k}')} and "
                    f"{pair(f'teacher.second.{t}.mAP@{k}')}." for t in types
                    if f"second.teacher.{t}.mAP@{k}" in metrics)
    return (f"**A second teacher.** The last column scores every method against "
            f"{metrics['second.name']} (`second_teacher`, test queries only; "
            f"{metrics.get('second.seconds_per_query', float('nan')):.1f} s a query) instead "
            f"of this run's teacher, which the student trains on. The run's teacher's ranking "
            f"against its top {k}: mAP@{k} {pair(f'second.teacher.mAP@{k}')}; its ranking "
            f"against the run's teacher's top {k}: {pair(f'teacher.second.mAP@{k}')}.{kinds}")


def _recall_cell(recall: float | None, stderr: float | None) -> str:
    if recall is None:
        return ""
    return f"{recall:.2f}" if stderr is None else f"{recall:.2f} ({stderr:.2f})"
