"""The paper's qualitative claims (docs/method.md §5), checked on one experiment's sweep results.

Each claim becomes a difference of two test-query means with a standard error, and a verdict:
*holds* when the difference has the claimed sign by more than two standard errors, *does not
hold* when it has the other sign by more than two, and *cannot be told apart* in between.  The
standard error of a difference combines the two runs' standard errors as if independent; both
runs score the same test queries, whose errors are positively correlated, so this is an
overestimate and the verdicts are conservative.  No value is chosen by its test figure: each
claim names in advance which settings it compares (e.g. the smallest p above 0, not the best).
"""

from __future__ import annotations

import math
from pathlib import Path

from attribution.figures.base import _num
from attribution.figures.sweeps import aggregate, read_rows

Z = 2.0  # standard errors a difference must exceed to count as a difference
HOLDS, FAILS, TIED = "holds", "does not hold", "cannot be told apart (within 2 s.e.)"


def _verdict(d: float, se: float) -> str:
    """Verdict for a claimed positive difference ``d`` ± ``se``."""
    if math.isnan(d):
        return "no result"
    if abs(d) <= Z * se:
        return TIED
    return HOLDS if d > 0 else FAILS


def _points(rows: list[dict], key: str, metric: str) -> dict[str, tuple[float, float]]:
    return {p["x"]: (p["mean"], p["stderr"]) for p in aggregate(rows, key, metric)}


def _diff(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], math.hypot(a[1], b[1])


def _pm(d: float, se: float) -> str:
    return f"{d:+.3f} ± {se:.3f}"


def _row(claim: str, sweep: str, ours: str, verdict: str) -> dict:
    return {"claim": claim, "sweep": sweep, "ours": ours, "verdict": verdict}


def feature_space_claims(rows: list[dict], metric: str) -> list[dict]:
    """Tuned > untuned, per feature space: the student on a space vs that space's raw cosine."""
    tail = metric.split(".", 1)[1]
    out = []
    for space, tuned in _points(rows, "student.feature", metric).items():
        base = [r for r in rows if r.get("student.feature") == space]
        b = (_num(base[0].get(f"baseline.{space}.{tail}")),
             _num(base[0].get(f"baseline.{space}.{tail}_stderr")))
        if math.isnan(b[0]):
            continue
        d, se = _diff(tuned, b)
        out.append(_row(f"tuned > untuned: {space}", "feature_space",
                        f"{b[0]:.3f} → {tuned[0]:.3f} ({_pm(d, se)})", _verdict(d, se)))
    return out


def loss_claims(rows: list[dict], metric: str) -> list[dict]:
    """MSE trains worst; ordinal ≈ cross-entropy."""
    pts = _points(rows, "student.loss", metric)
    out = []
    if "mse" in pts and len(pts) > 1:
        worst_other = min((v for k, v in pts.items() if k != "mse"), key=lambda v: v[0])
        name = next(k for k, v in pts.items() if v == worst_other and k != "mse")
        d, se = _diff(worst_other, pts["mse"])
        out.append(_row("MSE trains worst", "loss",
                        f"mse {pts['mse'][0]:.3f} vs the next worst, {name} {worst_other[0]:.3f} "
                        f"({_pm(d, se)})", _verdict(d, se)))
    if "ordinal" in pts and "ce" in pts:
        d, se = _diff(pts["ordinal"], pts["ce"])
        verdict = HOLDS + " (within 2 s.e.)" if abs(d) <= Z * se else FAILS
        out.append(_row("ordinal ≈ cross-entropy", "loss",
                        f"ordinal {pts['ordinal'][0]:.3f}, ce {pts['ce'][0]:.3f} ({_pm(d, se)})",
                        verdict))
    return out


def _numeric(pts: dict[str, tuple[float, float]]) -> list[tuple[float, tuple[float, float]]]:
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
    d, se = _diff(z, a)
    out = [_row("mAP rises with training queries", "data_scaling",
                f"Q={q0:g}: {a[0]:.3f} → Q={qn:g}: {z[0]:.3f} ({_pm(d, se)})", _verdict(d, se))]
    first = ((b[0] - a[0]) / math.log2(q1 / q0), math.hypot(a[1], b[1]) / math.log2(q1 / q0))
    last = ((z[0] - y[0]) / math.log2(qn / qm), math.hypot(y[1], z[1]) / math.log2(qn / qm))
    d, se = first[0] - last[0], math.hypot(first[1], last[1])
    out.append(_row("... then saturates", "data_scaling",
                    f"gain per doubling of Q: first {first[0]:+.3f} (Q {q0:g}→{q1:g}), last "
                    f"{last[0]:+.3f} (Q {qm:g}→{qn:g}); difference {_pm(d, se)}", _verdict(d, se)))
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
    d1, se1 = _diff(small, zero[0])
    d2, se2 = _diff(small, big)
    return [_row("a little outside-set sampling helps", "outside_p",
                 f"p=0: {zero[0][0]:.3f}, p={p_small:g}: {small[0]:.3f} ({_pm(d1, se1)})",
                 _verdict(d1, se1)),
            _row("... much hurts", "outside_p",
                 f"p={p_small:g}: {small[0]:.3f}, p={p_big:g}: {big[0]:.3f} ({_pm(d2, se2)})",
                 _verdict(d2, se2))]


def budget_claims(rows: list[dict], metric: str) -> list[dict]:
    """A fixed budget of Q × M pairs trades queries against candidates; docs/method.md §5 names
    no direction, so the verdict says which way ours goes (more queries vs more candidates)."""
    pts = _numeric(_points(rows, "student.n_queries", metric))
    if len(pts) < 2:
        return []
    (qa, a), (qb, b) = pts[0], pts[-1]
    d, se = _diff(b, a)
    v = _verdict(d, se)
    direction = {HOLDS: "more queries, fewer candidates is better",
                 FAILS: "more candidates, fewer queries is better"}.get(v, v)
    return [_row("a fixed Q × M budget trades queries against candidates", "fixed_budget",
                 f"Q={qa:g}: {a[0]:.3f}, Q={qb:g}: {b[0]:.3f} ({_pm(d, se)})", direction)]


CLAIMS = {"feature_space": feature_space_claims, "loss": loss_claims,
          "data_scaling": scaling_claims, "outside_p": outside_p_claims,
          "fixed_budget": budget_claims}


def experiment_rows(table: Path, experiment: str) -> list[dict]:
    """The rows of a sweep table that belong to one experiment (its ``experiment`` column)."""
    if not table.is_file():
        return []
    return [r for r in read_rows(table) if r.get("experiment") == experiment]


def check_claims(results_root: str | Path, experiment: str, metric: str) -> list[dict]:
    """Every claim whose sweep has results for ``experiment`` under ``results_root``
    (``runs/sweeps``)."""
    out = []
    for sweep, fn in CLAIMS.items():
        rows = experiment_rows(Path(results_root) / sweep / "results.csv", experiment)
        if rows:
            out += fn(rows, metric)
    return out


def format_claims(claims: list[dict], metric: str) -> list[str]:
    """Markdown table lines."""
    if not claims:
        return []
    return [f"| claim (docs/method.md §5) | sweep | ours, test {metric} (difference ± s.e.) | "
            "verdict |", "|---|---|---|---|",
            *(f"| {c['claim']} | `{c['sweep']}` | {c['ours']} | {c['verdict']} |"
              for c in claims)]
