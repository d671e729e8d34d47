"""The paper's figures, drawn from sweep results (a local results.csv, or a W&B sweep online).

Each sweep file in ``sweeps/`` varies one or two config keys; its figure puts the varied key on
the x-axis (a line for numbers, bars for names) and the sweep's metric on the y-axis.  Several
seeds of one setting (``student.seed``) are averaged and their standard error drawn; a setting
run once shows the standard error over test queries instead (the caption says which).  A feature
space sweep also draws each space's untuned baseline beside the tuned student.

``quality_vs_throughput`` places every method of a run (student, untuned features, teacher) by
queries/s and attribution quality with storage as marker size (the paper's Figure 1).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attribution.metrics import standard_error  # noqa: E402
from attribution.sweep_spec import load_sweep  # noqa: E402

SEED_KEY = "student.seed"
METHOD_NAMES = {"dtrak": "D-TRAK", "abu_diagonal": "AbU (diagonal Fisher)"}
LABELS = {
    "student.loss": "learning-to-rank loss",
    "student.feature": "feature space",
    "student.n_queries": "training queries Q",
    "student.p_outside": "probability p of a candidate from outside the K-set",
    "student.m": "candidates kept per query M",
    "student.budget": "pairs budget Q×M",
}


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_rows(table: str | Path) -> list[dict]:
    """Rows of a local sweep table (``runs/sweeps/<sweep>/results.csv``)."""
    with open(table) as f:
        return list(csv.DictReader(f))


def rows_from_wandb(sweep_path: str, api=None) -> list[dict]:
    """Rows of an online W&B sweep (``entity/project/sweep_id``): each run's config flattened to
    dotted keys, plus its summary metrics — the same columns as a local results.csv."""
    if api is None:
        import wandb

        api = wandb.Api()
    rows = []
    for run in api.sweep(sweep_path).runs:
        if getattr(run, "state", "finished") != "finished":
            continue
        row = _flatten(dict(run.config))
        row.update({k: v for k, v in dict(run.summary).items() if not k.startswith("_")})
        rows.append(row)
    return rows


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "value" not in v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v["value"] if isinstance(v, dict) else v
    return out


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def report_metric(sweep: dict) -> str:
    """The test-query figure a sweep's plot shows: ``student.mAP@<first k_eval>`` of the
    sweep's experiment config."""
    from attribution.config import load_config

    return f"student.mAP@{load_config(sweep['config']).student.k_eval[0]}"


def varied_keys(sweep: dict) -> list[str]:
    """The sweep's parameters that take more than one value (the seed is not an axis)."""
    params = sweep["parameters"]
    return [k for k, spec in params.items()
            if k != SEED_KEY and len(spec.get("values", [spec.get("value")])) > 1]


def aggregate(rows: list[dict], x_key: str, metric: str) -> list[dict]:
    """Per x value: mean of ``metric`` over seeds and its standard error.

    With one run per x value (or seeds that agree exactly) the error is the run's own
    ``<metric>_stderr`` (over test queries).
    Returns a list of {x, mean, stderr, n, over} in the order x values first appear.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if x_key in r and not math.isnan(_num(r.get(metric))):
            groups[str(r[x_key])].append(r)
    out = []
    for x, rs in groups.items():
        vals = np.array([_num(r[metric]) for r in rs])
        # several seeds that agree exactly (a figure the seed does not touch, e.g. an untuned
        # baseline) carry no seed spread: show the spread over test queries instead
        if len(vals) >= 2 and np.ptp(vals) > 0:
            err, over = standard_error(vals), "seeds"
        else:
            err, over = _num(rs[0].get(f"{metric}_stderr")), "test queries"
        out.append({"x": x, "mean": float(vals.mean()), "stderr": err, "n": len(vals),
                    "over": over})
    return out


def _is_numeric(points: list[dict]) -> bool:
    return all(not math.isnan(_num(p["x"])) for p in points)


def sweep_figure(rows: list[dict], x_key: str, metric: str, path: str | Path,
                 title: str = "", budget: float | None = None) -> Path:
    """One sweep's figure: error-bar line (numeric x) or bars (names); tuned vs untuned bars
    when the rows carry ``baseline.<x value>.<metric tail>`` columns (feature spaces)."""
    points = aggregate(rows, x_key, metric)
    if not points:
        raise ValueError(f"no finished runs with '{x_key}' and '{metric}' to plot")
    tail = metric.split(".", 1)[1] if metric.startswith("student.") else metric
    base_rows = [{**r, "_base": r.get(f"baseline.{r.get(x_key)}.{tail}"),
                  "_base_stderr": r.get(f"baseline.{r.get(x_key)}.{tail}_stderr")}
                 for r in rows]
    has_base = any(not math.isnan(_num(r["_base"])) for r in base_rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    over = {p["over"] for p in points}
    if _is_numeric(points) and not has_base:
        points.sort(key=lambda p: _num(p["x"]))
        xs = [_num(p["x"]) for p in points]
        ax.errorbar(xs, [p["mean"] for p in points], yerr=[p["stderr"] for p in points],
                    marker="o", capsize=4, label="student (tuned)")
        if budget:
            for x, p in zip(xs, points):
                ax.annotate(f"M={int(budget // x)}", (x, p["mean"]), textcoords="offset points",
                            xytext=(0, 8), ha="center", fontsize=8)
        if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    else:
        names = [p["x"] for p in points]
        pos = np.arange(len(names))
        width = 0.38 if has_base else 0.6
        if has_base:
            base = aggregate([{**r, "_m": r["_base"], "_m_stderr": r["_base_stderr"]}
                              for r in base_rows], x_key, "_m")
            bmap = {b["x"]: b for b in base}
            ax.bar(pos - width / 2, [bmap.get(n, {}).get("mean", np.nan) for n in names], width,
                   yerr=[bmap.get(n, {}).get("stderr", 0) for n in names], capsize=3,
                   label="untuned features", color="#bbbbbb")
            ax.bar(pos + width / 2, [p["mean"] for p in points], width,
                   yerr=[p["stderr"] for p in points], capsize=3, label="tuned (student)",
                   color="#1f77b4")
        else:
            ax.bar(pos, [p["mean"] for p in points], width, yerr=[p["stderr"] for p in points],
                   capsize=3, color="#1f77b4", label="student")
        ax.set_xticks(pos, names, rotation=20, ha="right", fontsize=8)
    ax.set_xlabel(LABELS.get(x_key, x_key))
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, title=f"error bars: s.e. over {' / '.join(sorted(over))}",
              title_fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


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
    for m, a in zip(methods, area):
        ax.errorbar(m["qps"], m["quality"], yerr=m["stderr"], fmt="none", ecolor="#555555",
                    capsize=3)
        ax.scatter(m["qps"], m["quality"], s=a, alpha=0.6)
        ax.annotate(f"{m['method']}\n{_human(m['storage'])}", (m["qps"], m["quality"]),
                    textcoords="offset points", xytext=(6, -14), fontsize=7)
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


def sweep_figures(sweeps_dir: str | Path, results_root: str | Path, out: str | Path,
                  wandb_sweeps: dict[str, str] | None = None, echo=print) -> dict[str, Path]:
    """A figure per sweep file with results (local table, or W&B when ``wandb_sweeps`` maps the
    sweep's name to ``entity/project/sweep_id``); returns {sweep name: png}."""
    made = {}
    for f in sorted(Path(sweeps_dir).glob("*.yaml")):
        sweep = load_sweep(f)
        if wandb_sweeps and f.stem in wandb_sweeps:
            rows = rows_from_wandb(wandb_sweeps[f.stem])
        else:
            table = Path(results_root) / f.stem / "results.csv"
            if not table.is_file():
                echo(f"[figures] {f.stem}: no results yet ({table}); run "
                     f"`attribution sweep {f}`")
                continue
            rows = read_rows(table)
        keys = varied_keys(sweep)
        if not keys:
            echo(f"[figures] {f.stem}: no varied parameter")
            continue
        budget = sweep["parameters"].get("student.budget", {}).get("value")
        # the sweep file's metric is what a sweep CHOOSES on (validation); the figure shows the
        # reported figure: test mAP at the experiment's first k_eval
        metric = report_metric(sweep)
        x_key = keys[0]
        try:
            made[f.stem] = sweep_figure(rows, x_key, metric, Path(out) / f"{f.stem}.png",
                                        title=f"{f.stem}: {sweep.get('description', '')}"
                                        .strip(": "), budget=_num(budget) if budget else None)
        except ValueError as err:  # e.g. runs made with other k_eval than the sweep's metric
            echo(f"[figures] {f.stem}: skipped ({err})")
            continue
        echo(f"[figures] {f.stem}: {made[f.stem]}")
    return made


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
    ax.set_title(f"Counterfactual quality vs throughput ({len(result['queries'])} test queries, "
                 "s.e. bars)", fontsize=10)
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
