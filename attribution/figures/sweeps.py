"""The paper's sweep figures, drawn from sweep results (a local results.csv, or a W&B sweep online).

Each sweep file in ``sweeps/`` varies one or two config keys; its figure puts the varied key on
the x-axis (a line for numbers, bars for names) and the sweep's metric on the y-axis.  Several
seeds of one setting (``student.seed``) are averaged, and the error drawn combines the spread
over seeds with that over test queries (a seed moves the toy student's mAP@10 by ~0.002, the
test queries by ~0.02: a seeds-only bar would hide the larger noise); a setting run once shows
the standard error over test queries (the caption says which).  A feature
space sweep also draws each space's untuned baseline beside the tuned student.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from attribution.figures.base import LABELS, SEED_KEY, _num, _save, plt
from attribution.metrics import standard_error
from attribution.sweep_spec import load_sweep


def read_rows(table: str | Path, experiment: str | None = None) -> list[dict]:
    """Rows of a local sweep table (``runs/sweeps/<sweep>/results.csv``); with ``experiment``,
    only that experiment's rows (their ``experiment`` column)."""
    with open(table) as f:
        rows = list(csv.DictReader(f))
    return rows if experiment is None else [r for r in rows if r.get("experiment") == experiment]


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


def combined_axis(rows: list[dict], keys: list[str]) -> tuple[str, list[dict]]:
    """(x key, rows) for a sweep over ``keys``: the key itself for one; for a grid over several,
    a new column naming each combination ("head=linear, whiten=0.01"), one bar each, so no
    parameter is silently averaged over."""
    if len(keys) == 1:
        return keys[0], rows
    x_key = " × ".join(k.rsplit(".", 1)[-1] for k in keys)
    return x_key, [{**r, x_key: ", ".join(f"{k.rsplit('.', 1)[-1]}={r.get(k)}" for k in keys)}
                   for r in rows]


def aggregate(rows: list[dict], x_key: str, metric: str) -> list[dict]:
    """Per x value: mean of ``metric`` over seeds and its standard error.

    With one run per x value (or seeds that agree exactly) the error is the run's own
    ``<metric>_stderr`` (over test queries).  With several seeds it is √(s.e.² over seeds +
    q²), q the runs' mean ``<metric>_stderr``: the seeds share one set of test queries, so
    their spread leaves out the queries' noise (seeds only when the rows carry no stderr).
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
            query = np.array([_num(r.get(f"{metric}_stderr")) for r in rs])
            if np.isfinite(query).all():
                err, over = math.hypot(err, float(query.mean())), "seeds + test queries"
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


def sweep_figures(sweeps_dir: str | Path, results_root: str | Path, out: str | Path,
                  wandb_sweeps: dict[str, str] | None = None, echo=print,
                  experiment: str | None = None) -> dict[str, Path]:
    """A figure per sweep file with results (local table, or W&B when ``wandb_sweeps`` maps the
    sweep's name to ``entity/project/sweep_id``); returns {sweep name: png}.  ``experiment``
    keeps only the local rows of that experiment (a run's report shows its own sweeps)."""
    made = {}
    for f in sorted(Path(sweeps_dir).glob("*.yaml")):
        sweep = load_sweep(f, check_runs_too=False)  # its rows are finished runs
        if wandb_sweeps and f.stem in wandb_sweeps:
            rows = rows_from_wandb(wandb_sweeps[f.stem])
        else:
            table = Path(results_root) / f.stem / "results.csv"
            if not table.is_file():
                echo(f"[figures] {f.stem}: no results yet ({table}); run "
                     f"`attribution sweep {f}`")
                continue
            rows = read_rows(table, experiment)
            if experiment is not None and not rows:  # none of this experiment's
                continue
        keys = varied_keys(sweep)
        if not keys:
            echo(f"[figures] {f.stem}: no varied parameter")
            continue
        budget = sweep["parameters"].get("student.budget", {}).get("value")
        # the sweep file's metric is what a sweep CHOOSES on (validation); the figure shows the
        # reported figure: test mAP at the experiment's first k_eval
        metric = report_metric(sweep)
        x_key, rows = combined_axis(rows, keys)
        try:
            made[f.stem] = sweep_figure(rows, x_key, metric, Path(out) / f"{f.stem}.png",
                                        title=f"{f.stem}: {sweep.get('description', '')}"
                                        .strip(": "), budget=_num(budget) if budget else None)
        except ValueError as err:  # e.g. runs made with other k_eval than the sweep's metric
            echo(f"[figures] {f.stem}: skipped ({err})")
            continue
        echo(f"[figures] {f.stem}: {made[f.stem]}")
    return made
