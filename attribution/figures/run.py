"""A run's own figures, from its finished artifacts (metrics.json, counterfactual.json, abc.json).

``quality_vs_throughput`` places every method of a run (student, untuned features, teacher) by
queries/s and attribution quality with storage as marker size (the paper's Figure 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from attribution.figures.base import METHOD_NAMES, _num, _save, plt


def methods_of_run(metrics: dict, k: int) -> list[dict]:
    """(method, queries/s, quality, storage) of each method a run measured; quality = mAP@k
    against the teacher's ranking, so the teacher itself sits at 1 by construction."""
    out = []
    m = f"mAP@{k}"
    if f"student.{m}" in metrics:
        out.append({"method": "student (ours)", "key": "student", "qps": metrics.get("student.queries_per_second"),
                    "quality": metrics[f"student.{m}"],
                    "stderr": metrics.get(f"student.{m}_stderr", 0.0),
                    "storage": metrics.get("student.storage_bytes", 0)})
    for key, v in metrics.items():
        if key.startswith("baseline.") and key.endswith(f".{m}"):
            feat = key[len("baseline."): -len(f".{m}")]
            if "." in feat:  # a per-query-type figure (baseline.<method>.planted.mAP@k)
                continue
            out.append({"method": METHOD_NAMES.get(feat, f"untuned {feat}"), "key": feat,
                        "qps": metrics.get(f"baseline.{feat}.queries_per_second"),
                        "quality": v, "stderr": metrics.get(f"{key}_stderr", 0.0),
                        "storage": metrics.get(f"baseline.{feat}.storage_bytes", 0)})
    if metrics.get("teacher.seconds_per_query"):
        out.append({"method": "teacher AbU+ (reference)", "key": "teacher",
                    "qps": 1.0 / metrics["teacher.seconds_per_query"], "quality": 1.0,
                    "stderr": 0.0, "storage": metrics.get("teacher.storage_bytes", 0)})
        if f"teacher.self_{m}" in metrics:  # the ceiling: the teacher under fresh noise
            out.append({"method": "teacher AbU+, fresh noise (ceiling)",
                        "key": "teacher_replicate",
                        "qps": 1.0 / metrics["teacher.seconds_per_query"],
                        "quality": metrics[f"teacher.self_{m}"],
                        "stderr": metrics.get(f"teacher.self_{m}_stderr", 0.0),
                        "storage": metrics.get("teacher.storage_bytes", 0)})
    return [o for o in out if o["qps"] and not math.isnan(_num(o["qps"]))]


def quality_vs_throughput(methods: list[dict], k: int, path: str | Path) -> Path:
    """Paper Fig. 1 on our world: x = queries/s (log), y = quality, marker area ∝ storage."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sizes = np.array([max(float(m["storage"]), 1.0) for m in methods])
    area = 40 + 600 * np.sqrt(sizes / sizes.max())
    placed: list[tuple[float, float]] = []
    for m, a in zip(methods, area):
        ax.errorbar(m["qps"], m["quality"], yerr=m["stderr"], fmt="none", ecolor="#555555",
                    capsize=3)
        ax.scatter(m["qps"], m["quality"], s=a, alpha=0.6)
        # a label whose point sits on an earlier one's (same speed and quality, e.g. the
        # teacher and its ceiling) goes below that one's label instead of over it
        near = sum(abs(math.log10(m["qps"] / x)) < 0.5 and abs(m["quality"] - y) < 0.08
                   for x, y in placed)
        placed.append((m["qps"], m["quality"]))
        ax.annotate(f"{m['method']}\n{_human(m['storage'])}", (m["qps"], m["quality"]),
                    textcoords="offset points", xytext=(6, -14 - 20 * near), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("attribution queries / s (end to end, batch 1, this machine)")
    ax.set_ylabel(f"mAP@{k} vs the teacher's ranking")
    ax.set_title("Quality vs throughput (marker area ~ storage)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    lo = min(m["qps"] for m in methods)
    hi = max(m["qps"] for m in methods)
    ax.set_xlim(lo / 5, hi * 20)
    ax.set_ylim(0, 1.1)
    return _save(fig, path)


def tuned_vs_untuned(metrics: dict, ks: list[int], feature: str, path: str | Path) -> Path:
    """The run's student against its own untuned features, mAP@k per k, with s.e. bars."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    pos = np.arange(len(ks))
    for off, prefix, label, color in ((-0.2, f"baseline.{feature}", f"untuned {feature}",
                                       "#bbbbbb"),
                                      (0.2, "student", "tuned (student)", "#1f77b4")):
        ax.bar(pos + off, [metrics.get(f"{prefix}.mAP@{k}", np.nan) for k in ks], 0.4,
               yerr=[metrics.get(f"{prefix}.mAP@{k}_stderr", 0) for k in ks], capsize=3,
               label=label, color=color)
    ax.set_xticks(pos, [f"mAP@{k}" for k in ks])
    ax.set_ylabel("mAP vs the teacher's top-k (test queries)")
    ax.set_title("Feature space before / after tuning", fontsize=10)
    ax.legend(fontsize=8, title="error bars: s.e. over test queries", title_fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _human(n: float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def counterfactual_figure(result: dict, metrics: dict, path: str | Path) -> Path:
    """Paper Fig. 1's y-axis: leave-K-out ΔLoss of each method vs its queries/s (marker area ~
    storage).  With the random-removal control run, y is each method's ΔLoss minus random's on
    the same queries (paired, so query-to-query variation cancels) and the control sits at 0."""
    k0 = next(int(key.split("@")[1]) for key in metrics if key.startswith("student.mAP@"))
    by_key = {m["key"]: m for m in methods_of_run(metrics, k0)}
    paired = "random" in result["methods"]
    y_key = "vs_random" if paired else "delta_loss"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pts = [(m, r, by_key[m]) for m, r in result["methods"].items()
           if m in by_key and y_key in r]
    sizes = np.array([max(float(p[2]["storage"]), 1.0) for p in pts] or [1.0])
    for (_, r, info), size in zip(pts, sizes):
        ax.errorbar(info["qps"], r[y_key], yerr=r[f"{y_key}_stderr"], fmt="none",
                    ecolor="#555555", capsize=3)
        ax.scatter(info["qps"], r[y_key], s=40 + 600 * np.sqrt(size / sizes.max()), alpha=0.6)
        ax.annotate(info["method"], (info["qps"], r[y_key]), textcoords="offset points",
                    xytext=(6, -12), fontsize=7)
    if paired:
        ax.axhline(0.0, ls="--", color="#999999", label="random removal (control)")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("attribution queries / s (batch 1, this machine)")
    what = "ΔLoss − random's ΔLoss" if paired else "ΔLoss"
    ax.set_ylabel(f"{what}, top-{result['k']} removed (retrained)")
    what = "test" if result.get("split", "test") == "test" else "training (choosing)"
    ax.set_title(f"Counterfactual quality vs throughput ({len(result['queries'])} {what} "
                 "queries, s.e. bars)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def abc_figure(summary: dict, path: str | Path) -> Path:
    """The customization benchmark: mAP of the exemplars per method, object vs style concepts
    (held-out), s.e. over synthesized images, chance as a dashed line."""
    methods = list(summary["methods"])
    kinds = [k for k in ("object", "style") if any(k in r for r in summary["methods"].values())]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(methods) + 2), 4.2))
    pos = np.arange(len(methods))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        rows = [summary["methods"][m].get(kind, {}) for m in methods]
        ax.bar(pos + (i - (len(kinds) - 1) / 2) * width, [r.get("mAP", np.nan) for r in rows],
               width, yerr=[r.get("mAP_stderr", 0.0) for r in rows], capsize=2, label=kind)
    ax.axhline(summary["chance"]["mAP"], ls="--", color="#999999", label="chance")
    ax.set_xticks(pos, [m.replace("+", "+\n").replace(" tuned", "\ntuned") for m in methods],
                  fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("mAP of the exemplars (held-out concepts)")
    ax.set_title(f"Customization benchmark: pool of {summary['pool']}, "
                 f"{summary['exemplars_per_concept']} exemplars per concept", fontsize=10)
    ax.legend(fontsize=8, title="error bars: s.e. over synthesized images", title_fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.set_ylim(0, 1.05)
    return _save(fig, path)
