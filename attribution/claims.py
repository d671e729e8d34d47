"""The paper's qualitative claims (docs/method.md §5), checked on one experiment's sweep results.

Each claim becomes a difference of two test-query means with a standard error, and a verdict:
*holds* when the difference has the claimed sign by more than two standard errors, *does not
hold* when it has the other sign by more than two, and *cannot be told apart* in between.  Both
runs score the same test queries, so the difference is PAIRED where the sweep saved each run's
per-query AP (``runs/sweeps/<sweep>/ap/``): the standard error of the per-query differences.
Without those files it falls back to combining the two standard errors as if independent (an
overestimate: the same queries' errors are positively correlated), and the row says "unpaired".
No value is chosen by its test figure: each claim names in advance which settings it compares
(e.g. the smallest p above 0, not the best one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution.common.files import DataFileError, load_npz
from attribution.figures.base import _num
from attribution.figures.sweeps import aggregate, read_rows
from attribution.metrics import standard_error
from attribution.sweep_spec import ap_file

Z = 2.0  # standard errors a difference must exceed to count as a difference
HOLDS, FAILS, TIED = "holds", "does not hold", "cannot be told apart (within 2 s.e.)"


def _verdict(d: float, se: float) -> str:
    """Verdict for a claimed positive difference ``d`` ± ``se``."""
    if math.isnan(d):
        return "no result"
    if abs(d) <= Z * se:
        return TIED
    return HOLDS if d > 0 else FAILS


@dataclass
class Point:
    """One setting's test figure: mean, standard error, and (when saved) each query's AP."""

    mean: float
    se: float
    ap: np.ndarray | None = None


def _ap_arrays(row: dict, member: str) -> np.ndarray | None:
    """The row's per-query AP (``member``, e.g. ``student@10``), or None: no file, a file that
    does not fit, or a row without its table folder (rows built in memory)."""
    folder = row.get("_table_dir")
    if folder is None or "run" not in row or "experiment" not in row:
        return None
    path = ap_file(folder, row["experiment"], row["run"])
    if not path.is_file():
        return None
    try:
        arr = load_npz(path, "per-query AP of a sweep run").get(member)
    except DataFileError:
        return None
    if arr is None or arr.ndim != 1 or not np.isfinite(arr).all():
        return None
    return arr.astype(np.float64)


def _points(rows: list[dict], key: str, metric: str, member: str | None = None
            ) -> dict[str, Point]:
    """Per setting of ``key``: the aggregated test figure, with the per-query AP (averaged
    over the setting's seeds) when every run of the setting saved it and it agrees with the
    table's figure."""
    member = member or f"{_ap_prefix(metric)}student@{metric.rsplit('@', 1)[1]}"
    out = {}
    for p in aggregate(rows, key, metric):
        runs = [r for r in rows if str(r.get(key)) == p["x"]]
        arrays = [_ap_arrays(r, member) for r in runs]
        ap = None
        if arrays and all(a is not None for a in arrays) and len({len(a) for a in arrays}) == 1:
            ap = np.mean(arrays, axis=0)
            if "student@" in member and abs(ap.mean() - p["mean"]) > 1e-6:
                ap = None  # the file belongs to another run than the table's row
        out[p["x"]] = Point(p["mean"], p["stderr"], ap)
    return out


def _combo(terms: list[tuple[float, Point]]) -> tuple[float, float, bool]:
    """Σ wᵢ·pointᵢ ± s.e.: over queries (paired) when every point carries per-query AP of one
    length, else with the points' standard errors combined as if independent.  Returns
    (value, s.e., paired?)."""
    aps = [p.ap for _, p in terms]
    if all(a is not None for a in aps) and len({len(a) for a in aps}) == 1:
        d = sum(w * a for (w, _), a in zip(terms, aps))
        return float(d.mean()), standard_error(d), True
    return (sum(w * p.mean for w, p in terms),
            math.sqrt(sum((w * p.se) ** 2 for w, p in terms)), False)


def _diff(a: Point, b: Point) -> tuple[float, float, bool]:
    """a − b ± s.e. (paired over queries when both carry per-query AP)."""
    return _combo([(1.0, a), (-1.0, b)])


def _pm(d: float, se: float, paired: bool = True) -> str:
    return f"{d:+.3f} ± {se:.3f}" + ("" if paired else ", unpaired")


def _row(claim: str, sweep: str, ours: str, verdict: str) -> dict:
    return {"claim": claim, "sweep": sweep, "ours": ours, "verdict": verdict}


def _k(metric: str) -> str:
    return metric.rsplit("@", 1)[1]


SECOND = "second."  # a metric measured against the second teacher: second.student.mAP@k


def _ap_prefix(metric: str) -> str:
    """The per-query AP files' member prefix of a metric: "" for the run's teacher,
    "second:" for the second teacher (evaluation.per_query_ap)."""
    return "second:" if metric.startswith(SECOND) else ""


def feature_space_claims(rows: list[dict], metric: str) -> list[dict]:
    """Tuned > untuned, per feature space: the student on a space vs that space's raw cosine."""
    against = SECOND if metric.startswith(SECOND) else ""
    tail = metric[len(against):].split(".", 1)[1]
    out = []
    for space, tuned in _points(rows, "student.feature", metric).items():
        run = next(r for r in rows if str(r.get("student.feature")) == space)
        b = Point(_num(run.get(f"{against}baseline.{space}.{tail}")),
                  _num(run.get(f"{against}baseline.{space}.{tail}_stderr")),
                  _ap_arrays(run, f"{_ap_prefix(metric)}baseline@{_k(metric)}"))
        if math.isnan(b.mean):
            continue
        d, se, paired = _diff(tuned, b)
        out.append(_row(f"tuned > untuned: {space}", "feature_space",
                        f"{b.mean:.3f} → {tuned.mean:.3f} ({_pm(d, se, paired)})",
                        _verdict(d, se)))
    return out


def loss_claims(rows: list[dict], metric: str) -> list[dict]:
    """MSE trains worst (vs the worst of the other losses); ordinal ≈ cross-entropy."""
    pts = _points(rows, "student.loss", metric)
    out = []
    if "mse" in pts and len(pts) > 1:
        name = min((k for k in pts if k != "mse"), key=lambda k: pts[k].mean)
        d, se, paired = _diff(pts[name], pts["mse"])
        out.append(_row("MSE trains worst", "loss",
                        f"mse {pts['mse'].mean:.3f} vs the next worst, {name} "
                        f"{pts[name].mean:.3f} ({_pm(d, se, paired)})", _verdict(d, se)))
    if "ordinal" in pts and "ce" in pts:
        d, se, paired = _diff(pts["ordinal"], pts["ce"])
        verdict = HOLDS + " (within 2 s.e.)" if abs(d) <= Z * se else FAILS
        out.append(_row("ordinal ≈ cross-entropy", "loss",
                        f"ordinal {pts['ordinal'].mean:.3f}, ce {pts['ce'].mean:.3f} "
                        f"({_pm(d, se, paired)})", verdict))
    return out


def _numeric(pts: dict[str, Point]) -> list[tuple[float, Point]]:
    return sorted(((_num(x), v) for x, v in pts.items() if not math.isnan(_num(x))),
                  key=lambda p: p[0])


def scaling_claims(rows: list[dict], metric: str) -> list[dict]:
    """mAP rises with the number of training queries, then saturates: the gain per doubling of Q
    over the last interval is below the gain per doubling over the first."""
    pts = _numeric(_points(rows, "student.n_queries", metric))
    if len(pts) < 3:
        return []
    (q0, a), (q1, b) = pts[0], pts[1]
    (qm, y), (qn, z) = pts[-2], pts[-1]
    d, se, paired = _diff(z, a)
    out = [_row("mAP rises with training queries", "data_scaling",
                f"Q={q0:g}: {a.mean:.3f} → Q={qn:g}: {z.mean:.3f} ({_pm(d, se, paired)})",
                _verdict(d, se))]
    l1, l2 = math.log2(q1 / q0), math.log2(qn / qm)
    first, last = (b.mean - a.mean) / l1, (z.mean - y.mean) / l2
    d, se, paired = _combo([(1 / l1, b), (-1 / l1, a), (-1 / l2, z), (1 / l2, y)])
    out.append(_row("... then saturates", "data_scaling",
                    f"gain per doubling of Q: first {first:+.3f} (Q {q0:g}→{q1:g}), last "
                    f"{last:+.3f} (Q {qm:g}→{qn:g}); difference {_pm(d, se, paired)}",
                    _verdict(d, se)))
    return out


def outside_p_claims(rows: list[dict], metric: str) -> list[dict]:
    """A little sampling outside the K-set helps (the smallest p > 0 vs p = 0), much hurts (the
    largest p vs the smallest p > 0)."""
    pts = _numeric(_points(rows, "student.p_outside", metric))
    zero = [v for p, v in pts if p == 0]
    pos = [(p, v) for p, v in pts if p > 0]
    if not zero or len(pos) < 2:
        return []
    (p_small, small), (p_big, big) = pos[0], pos[-1]
    d1, se1, paired1 = _diff(small, zero[0])
    d2, se2, paired2 = _diff(small, big)
    return [_row("a little outside-set sampling helps", "outside_p",
                 f"p=0: {zero[0].mean:.3f}, p={p_small:g}: {small.mean:.3f} "
                 f"({_pm(d1, se1, paired1)})", _verdict(d1, se1)),
            _row("... much hurts", "outside_p",
                 f"p={p_small:g}: {small.mean:.3f}, p={p_big:g}: {big.mean:.3f} "
                 f"({_pm(d2, se2, paired2)})", _verdict(d2, se2))]


def budget_claims(rows: list[dict], metric: str) -> list[dict]:
    """A fixed budget of Q × M pairs trades queries against candidates; docs/method.md §5 names
    no direction, so the verdict says which way ours goes (more queries vs more candidates)."""
    pts = _numeric(_points(rows, "student.n_queries", metric))
    if len(pts) < 2:
        return []
    (qa, a), (qb, b) = pts[0], pts[-1]
    d, se, paired = _diff(b, a)
    v = _verdict(d, se)
    direction = {HOLDS: "more queries, fewer candidates is better",
                 FAILS: "more candidates, fewer queries is better"}.get(v, v)
    return [_row("a fixed Q × M budget trades queries against candidates", "fixed_budget",
                 f"Q={qa:g}: {a.mean:.3f}, Q={qb:g}: {b.mean:.3f} ({_pm(d, se, paired)})",
                 direction)]


CLAIMS = {"feature_space": feature_space_claims, "loss": loss_claims,
          "data_scaling": scaling_claims, "outside_p": outside_p_claims,
          "fixed_budget": budget_claims}


def experiment_rows(table: Path, experiment: str) -> list[dict]:
    """The rows of a sweep table that belong to one experiment (its ``experiment`` column),
    each knowing its table's folder (where the per-query AP files are)."""
    if not table.is_file():
        return []
    return [{**r, "_table_dir": table.parent} for r in read_rows(table, experiment)]


def check_claims(results_root: str | Path, experiment: str, metric: str) -> list[dict]:
    """Every claim whose sweep has results for ``experiment`` under ``results_root``
    (``runs/sweeps``)."""
    out = []
    for sweep, fn in CLAIMS.items():
        rows = experiment_rows(Path(results_root) / sweep / "results.csv", experiment)
        if rows:
            out += fn(rows, metric)
    return out


def stale_runs(results_root: str | Path, experiment: str,
               current: Callable[[str], str | None]) -> dict[str, list[str]]:
    """{sweep: [run ids]} of the claims' sweep rows that were run under another configuration
    than the one ``current(run_id)`` says that run would have now (its config hash; None = not
    known, never stale): a default changed since the sweep ran, so its figures are not this
    experiment's any more."""
    out = {}
    for sweep in CLAIMS:
        rows = experiment_rows(Path(results_root) / sweep / "results.csv", experiment)
        old = [r["run"] for r in rows
               if r.get("config") and current(r["run"]) not in (None, r["config"])]
        if old:
            out[sweep] = old
    return out


def format_claims(claims: list[dict], metric: str, second: list[dict] | None = None,
                  second_name: str = "the second teacher") -> list[str]:
    """Markdown table lines; with ``second`` (the same claims against a second teacher:
    ``check_claims(..., "second." + metric)``) a figure and a verdict under each teacher."""
    if not claims:
        return []
    if not second:
        return [f"| claim (docs/method.md §5) | sweep | ours, test {metric} (difference ± s.e.) "
                "| verdict |", "|---|---|---|---|",
                *(f"| {c['claim']} | `{c['sweep']}` | {c['ours']} | {c['verdict']} |"
                  for c in claims)]
    other = {(c["claim"], c["sweep"]): c for c in second}
    missing = {"ours": "—", "verdict": "no result (rerun the sweep)"}
    return [f"| claim (docs/method.md §5) | sweep | against this run's teacher: test {metric} "
            f"(difference ± s.e.) | verdict | against {second_name} | verdict |",
            "|---|---|---|---|---|---|",
            *(f"| {c['claim']} | `{c['sweep']}` | {c['ours']} | {c['verdict']} | "
              f"{other.get((c['claim'], c['sweep']), missing)['ours']} | "
              f"{other.get((c['claim'], c['sweep']), missing)['verdict']} |" for c in claims)]
