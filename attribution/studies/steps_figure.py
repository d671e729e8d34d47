"""The teacher step-size study's figure: four panels against the step factor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attribution.figures.base import _save, plt


def _step_lines(ax, rows: list[dict], k: int, planted: list[str], colour: str, tag: str,
                several: bool) -> None:
    """One damping's lines in the step figure's four panels."""
    rows = sorted(rows, key=lambda r: r["factor"])
    x = np.array([r["factor"] for r in rows])
    rise = np.array([r["query_loss_rise"] for r in rows])
    ax[0].errorbar(x, np.maximum(rise, 1e-12), yerr=[r["query_loss_rise_stderr"] for r in rows],
                   marker="o", capsize=3, label=tag or None, color=colour)
    ax[1].errorbar(x, [r["share_items_rising"] for r in rows],
                   yerr=[r["share_items_rising_stderr"] for r in rows], marker="o", capsize=3,
                   color=colour)
    for key, style in zip(planted, ("-", "--", ":", "-.")):
        ax[2].plot(x, [r[key] for r in rows], marker="o", ls=style,
                   color=colour if several else None,
                   label=" ".join(filter(None, [key.replace(" recall@10", ""), tag])))
    nxt = [(r["factor"], r[f"vs_next.mAP@{k}"], r[f"vs_next.mAP@{k}_stderr"]) for r in rows
           if f"vs_next.mAP@{k}" in r]
    if nxt:
        ax[3].errorbar([n[0] for n in nxt], [n[1] for n in nxt], yerr=[n[2] for n in nxt],
                       marker="o", capsize=3, color=colour,
                       label=" ".join(filter(None, ["vs the next larger step", tag])))
    if several:
        return
    for kind, style, c in (("planted", "--", "C2"), ("ordinary", ":", "C3")):
        by_kind = [(r["factor"], r[f"vs_next.{kind}.mAP@{k}"]) for r in rows
                   if f"vs_next.{kind}.mAP@{k}" in r]
        if by_kind:
            ax[3].plot([b[0] for b in by_kind], [b[1] for b in by_kind], marker=".", ls=style,
                       color=c, label=f"vs the next step, {kind} queries")
    for key, marker, label, c in (("vs_teacher", "s", "vs the configured teacher", "k"),
                                  ("vs_one_step", "^", "vs one step of the same size", "C4")):
        vs = [(r["factor"], r[f"{key}.mAP@{k}"], r[f"{key}.mAP@{k}_stderr"])
              for r in rows if f"{key}.mAP@{k}" in r]
        if vs:
            ax[3].errorbar([v[0] for v in vs], [v[1] for v in vs], yerr=[v[2] for v in vs],
                           marker=marker, capsize=3, label=label, color=c)


def _step_title(summary: dict) -> str:
    split = summary.get("split", "test")
    what = "test queries" if split == "test" else "training queries (for choosing)"
    how = (f", along an unlearning path of {summary['path']} steps per decade"
           if summary.get("path") else
           ", ranked by the even part ½[ΔL(+η) + ΔL(−η)]" if summary.get("even") else "")
    model = (", loss change under its quadratic model"
             if summary.get("estimator") == "quadratic" else "")
    return (f"Teacher step size{how}{model} ({summary['fisher']}, {summary['queries']} {what}, "
            f"N = {summary['n_items']}; mean ± s.e.)")


def step_figure(summary: dict, path: str | Path) -> Path:
    """The teacher step-size study (``studies/teacher_steps.py``): four panels against the step factor,
    one line per damping when the study has several."""
    k = summary["k"]
    groups: dict[float, list[dict]] = {}
    for r in summary["rows"]:
        groups.setdefault(r.get("damping", summary.get("damping", 0.0)), []).append(r)
    several = len(groups) > 1
    planted = [key for key in summary["rows"][0] if key.endswith(" recall@10")]
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.6))
    for gi, (d, rows) in enumerate(sorted(groups.items())):
        # one colour per damping in every panel; line style per concept
        _step_lines(ax, rows, k, planted, f"C{gi}", f"damping {d:g}" if several else "",
                    several)
    ax[0].set(xscale="log", yscale="log", ylabel="query's own loss rise",
              title="how big the step is")
    if several:
        ax[0].legend(fontsize=8)
    ax[1].set(xscale="log", ylim=(0, 1.02),
              ylabel="share of items whose " + ("even part is > 0" if summary.get("even")
                                                else "loss rises"),
              title="how much it unlearns")
    ax[2].set(xscale="log", ylim=(0, 1.02), ylabel="planted recall@10", title="known answers")
    ax[2].legend(fontsize=7)
    ax[3].axhline(0.9, color="grey", lw=0.8, ls=":")
    ax[3].set(xscale="log", ylim=(0, 1.02), ylabel=f"mAP@{k} agreement", title="stability")
    ax[3].legend(fontsize=7)
    for a in ax:
        a.set_xlabel("step factor (× configured η/gain)")
    fig.suptitle(_step_title(summary), fontsize=10)
    return _save(fig, path)
