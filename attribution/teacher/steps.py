"""Step-size study: how the teacher's rankings depend on the size of its one unlearning step.

The step is θ = θ0 + η·P⁻¹g, with P the Fisher times ``teacher.gain`` plus a damping that is a
fixed fraction of the scaled Fisher, so η/gain is the only knob: the study multiplies the
configured step by each of ``factors`` (default 10⁻⁴ … 10, five decades; factor 1 is the
configured teacher, and with gain N a factor of 1/N is the reference's gain N²).  Each test query
is unlearned once per factor from the same query gradient (the teacher's own (t, ε) draws) and
the whole training set is scored with the teacher's own item noise.  Per factor:

* the query's own loss rise (after − before): how far from a small first-order step it is;
* the share of training items whose loss rises (every item rising means the step unlearns
  everything, not the query);
* planted-concept recall@10 (the known answers: each planted item exists only in its concept);
* mAP@k agreement with the next larger factor (that factor's top-k as positives, this factor's
  ranking) and with the configured teacher: whether the rankings are stable to a 10× change.

Factor 1 reproduces the stored teacher ranking exactly (same draws, same noise), a check the
summary reports.  One file per (factor, query): a killed study resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attribution.callbacks import map_at_ks
from attribution.common.files import (
    DataFileError,
    Dirs,
    atomic_save_npy,
    atomic_write_bytes,
    load_npy,
)
from attribution.common.plain import to_dict
from attribution.config import planted_for
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.metrics import standard_error
from attribution.teacher.evaluate import planted_known_answers
from attribution.teacher.run import build_scorer, make_queries

FACTORS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
PARTIAL = "delete it; rerunning the study recomputes only this query"


def query_file(out: Path, factor: float, qid: int) -> Path:
    """Where the study keeps test query ``qid``'s influences at ``factor`` (+ a .json beside)."""
    return Path(out) / f"f{factor:g}" / f"test_{qid}.npy"


def load_row(path: Path, n_items: int) -> tuple[np.ndarray, dict]:
    """One (factor, query) file: float (n_items,) finite influences and its loss record."""
    row = load_npy(path, "A step-study query's influences", rebuild=PARTIAL)
    meta_path = path.with_suffix(".json")
    if row.shape != (n_items,) or not np.isfinite(row).all() or not meta_path.is_file():
        raise DataFileError(f"{path} holds {row.dtype} {row.shape} (or its .json is missing), "
                            f"expected {n_items} finite influences: {PARTIAL}")
    return row, json.loads(meta_path.read_text())


def score_factors(cfg, dirs: Dirs, out: Path, factors: list[float],
                  n_queries: int | None = None, progress: bool = True) -> dict:
    """Influence over all items of the first ``n_queries`` test queries at every factor; cached
    per (factor, query) under ``out/f<factor>/``.  -> {factor: (rows (Q, N), metas)}."""
    out.mkdir(parents=True, exist_ok=True)
    n_items = len(CaptionedImageSet(dirs["world"], verify=False))
    scorer = cands = queries = None
    results: dict[float, tuple[list, list]] = {f: ([], []) for f in factors}
    qs = QuerySet(dirs["queries"] / "query_test")
    ids = list(range(len(qs) if n_queries is None else min(n_queries, len(qs))))
    bar = tqdm(ids, desc="step study", disable=not progress)
    for qid in bar:
        paths = {f: query_file(out, f, qid) for f in factors}
        todo = [f for f in factors if not paths[f].is_file()]
        if todo:
            if scorer is None:  # the base losses L_j(θ0) are the teacher's own (cached there)
                scorer, cands = build_scorer(cfg, dirs["world"], dirs["text"],
                                             dirs["generator"], dirs["fisher"], dirs["teacher"])
                queries = [q for q in make_queries(cfg, dirs["queries"], cands, dirs["teacher"])
                           if q.split == "test"]
            rows = scorer.score_steps(queries[qid], [cfg.teacher.eta * f for f in todo])
            for f, r in zip(todo, rows):
                paths[f].parent.mkdir(parents=True, exist_ok=True)
                influence = r["influence"].detach().cpu().numpy().astype(np.float32)
                atomic_write_bytes(paths[f].with_suffix(".json"), json.dumps(
                    {k: r[k] for k in ("query_loss_before", "query_loss_after", "seconds")}
                ).encode())
                atomic_save_npy(paths[f], influence)
        for f in factors:
            row, meta = load_row(paths[f], n_items)
            results[f][0].append(row)
            results[f][1].append(meta)
    return {f: (np.stack(rows), metas) for f, (rows, metas) in results.items()}


def summarize(cfg, dirs: Dirs, scored: dict, k: int = 10) -> dict:
    """The study's table: per factor the loss rise, share of items rising, planted recall and
    agreement (see the module docstring), each over the scored test queries with s.e."""
    factors = sorted(scored)
    ranks = {f: np.argsort(-scored[f][0], axis=1, kind="stable") for f in factors}
    q = len(next(iter(ranks.values())))
    with np.load(dirs["teacher"] / "teacher_test.npz") as merged:
        teacher = merged["rank"][:q]
    world = CaptionedImageSet(dirs["world"], verify=False)
    test = QuerySet(dirs["queries"] / "query_test")
    planted = [to_dict(p) for p in planted_for(cfg.world, "test")]
    rows = []
    for i, f in enumerate(factors):
        infl, metas = scored[f]
        rise = np.array([m["query_loss_after"] - m["query_loss_before"] for m in metas])
        before = np.array([m["query_loss_before"] for m in metas])
        share = (infl > 0).mean(axis=1)
        row = {"factor": f, "eta": cfg.teacher.eta * f, "queries": q,
               "query_loss_rise": float(rise.mean()), "query_loss_rise_stderr": standard_error(rise),
               "relative_query_loss_rise": float((rise / before).mean()),
               "share_items_rising": float(share.mean()),
               "share_items_rising_stderr": standard_error(share)}
        known = planted_known_answers(world.attributes, test.attributes[:q], ranks[f], planted)
        row.update({f"{name} recall@10": r["recall@10"] for name, r in known.items()})
        vs_teacher = map_at_ks(ranks[f], teacher, [k])
        row[f"vs_teacher.mAP@{k}"] = vs_teacher[f"mAP@{k}"]
        row[f"vs_teacher.mAP@{k}_stderr"] = vs_teacher[f"mAP@{k}_stderr"]
        if i + 1 < len(factors):
            nxt = map_at_ks(ranks[f], ranks[factors[i + 1]], [k])
            row[f"vs_next.mAP@{k}"] = nxt[f"mAP@{k}"]
            row[f"vs_next.mAP@{k}_stderr"] = nxt[f"mAP@{k}_stderr"]
            row["next_factor"] = factors[i + 1]
        rows.append(row)
    exact = bool(1.0 in scored and np.array_equal(ranks[1.0], teacher))
    return {"k": k, "queries": q, "n_items": int(teacher.shape[1]), "eta": cfg.teacher.eta,
            "gain": cfg.teacher.gain, "fisher": cfg.teacher.fisher, "rows": rows,
            "factor_1_reproduces_teacher": exact}


def run_step_study(cfg, dirs: Dirs, out: Path, factors: list[float] | None = None,
                   n_queries: int | None = None, k: int = 10, progress: bool = True) -> dict:
    """Score, summarize, write ``steps.json`` in ``out``; return the summary."""
    factors = sorted(set(factors or FACTORS))
    if any(not np.isfinite(f) or f <= 0 for f in factors):
        raise ValueError(f"step factors must be positive numbers, got {factors}")
    with torch.no_grad():
        scored = score_factors(cfg, dirs, out, factors, n_queries, progress)
    summary = summarize(cfg, dirs, scored, k)
    atomic_write_bytes(out / "steps.json", json.dumps(summary, indent=2).encode())
    return summary


def format_steps(summary: dict) -> str:
    """The study as a fixed-width table (the CLI's and the report's)."""
    k = summary["k"]
    planted = [key for key in summary["rows"][0] if key.endswith(" recall@10")]
    head = (f"{'factor':>8}{'eta':>10}{'loss rise':>12}{'rel.':>8}{'items up':>10}"
            + "".join(f"{p.replace(' recall@10', ''):>15}" for p in planted)
            + f"{'vs next':>9}{'± s.e.':>8}{'vs teacher':>11}")
    lines = [f"teacher step study: {summary['queries']} test queries over all "
             f"{summary['n_items']} items, mAP@{k} agreement; factor 1 = the configured step "
             f"(reproduces the teacher exactly: {summary['factor_1_reproduces_teacher']})", head]
    for r in summary["rows"]:
        nxt = (f"{r[f'vs_next.mAP@{k}']:>9.3f}{r[f'vs_next.mAP@{k}_stderr']:>8.3f}"
               if f"vs_next.mAP@{k}" in r else " " * 17)
        lines.append(f"{r['factor']:>8g}{r['eta']:>10.2e}{r['query_loss_rise']:>12.2e}"
                     f"{r['relative_query_loss_rise']:>8.2f}{r['share_items_rising']:>10.2f}"
                     + "".join(f"{r[p]:>15.2f}" for p in planted)
                     + f"{nxt}{r[f'vs_teacher.mAP@{k}']:>11.3f}")
    return "\n".join(lines)
