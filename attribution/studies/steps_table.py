"""The step-size study's summary (``studies/teacher_steps.py``) as a fixed-width table: what the CLI
prints and the report shows, for the one-step, path and even-part studies alike."""

from __future__ import annotations


def format_steps(summary: dict) -> str:
    """The study as a fixed-width table (the CLI's and the report's)."""
    k = summary["k"]
    planted = [key for key in summary["rows"][0] if key.endswith(" recall@10")]
    kinds = summary.get("query_kinds", {})
    head = (f"{'damping':>8}{'factor':>8}{'eta':>10}{'loss rise':>12}{'rel.':>8}{'items up':>10}"
            + "".join(f"{p.replace(' recall@10', ''):>15}" for p in planted)
            + f"{'vs next':>9}{'± s.e.':>8}"
            + "".join(f"{'(' + kind + ')':>11}" for kind in kinds) + f"{'vs teacher':>11}"
            + (f"{'vs 1-step':>11}" if summary.get("path") or summary.get("even") else ""))
    split = summary.get("split", "test")
    what = ("test queries" if split == "test" else
            "training queries (validation concepts + ordinary; for choosing)")
    how = (f" along an unlearning path ({summary['path']} steps per decade)"
           if summary.get("path") else
           " of the EVEN part ½[ΔL(+η) + ΔL(−η)] (curvature along the step)"
           if summary.get("even") else "")
    if summary.get("estimator") == "quadratic":
        how += " of the loss change under its quadratic model"
    lines = [f"teacher step study{how}: {summary['queries']} {what} over all "
             f"{summary['n_items']} items, mAP@{k} agreement; factor 1 at damping "
             f"{summary.get('damping', '')} = the configured step"
             + (f" (reproduces the teacher exactly: {summary['factor_1_reproduces_teacher']})"
                if split == "test" and not summary.get("path") and not summary.get("even")
                else ""), head]
    for r in summary["rows"]:
        nxt = (f"{r[f'vs_next.mAP@{k}']:>9.3f}{r[f'vs_next.mAP@{k}_stderr']:>8.3f}"
               if f"vs_next.mAP@{k}" in r else " " * 17)
        vs_t = r.get(f"vs_teacher.mAP@{k}")
        lines.append(f"{r.get('damping', summary.get('damping', 0)):>8g}"
                     f"{r['factor']:>8g}{r['eta']:>10.2e}{r['query_loss_rise']:>12.2e}"
                     f"{r['relative_query_loss_rise']:>8.2f}{r['share_items_rising']:>10.2f}"
                     + "".join(f"{r[p]:>15.2f}" for p in planted)
                     + nxt + "".join(f"{r[f'vs_next.{kind}.mAP@{k}']:>11.3f}"
                                     if f"vs_next.{kind}.mAP@{k}" in r else " " * 11
                                     for kind in kinds)
                     + (f"{vs_t:>11.3f}" if vs_t is not None else f"{'':>11}")
                     + (f"{r.get(f'vs_one_step.mAP@{k}', float('nan')):>11.3f}"
                        if summary.get("path") or summary.get("even") else ""))
    if kinds:
        lines.append("vs next (" + ") / (".join(kinds) + "): the same agreement on the "
                     + " / ".join(f"{n} {kind}" for kind, n in kinds.items())
                     + " queries apart (planted: the prompt names a planted concept)")
    return "\n".join(lines)
