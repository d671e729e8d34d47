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

Each factor is scored by the teacher's own estimator: the exact ascent, or with
``teacher.estimator: quadratic`` its second-order model (every factor from one set of
predictions, ``studies.scoring.score_at``).  Factor 1 reproduces the stored teacher ranking exactly
(same draws, same noise), a check the summary reports.  One file per (factor, query): a killed
study resumes.

Two more axes.  ``dampings``: the same factors with the EK-FAC (or diagonal) damping changed —
λ = damping × the mean scaled eigenvalue, so a smaller damping lets the step grow along the
Fisher's weak directions, where a rare concept lives (the preconditioner's version of the
student's input whitening).  ``split="val"``: the study on TRAINING queries — those that prompt
a validation concept, whose planted items are known answers no test query is needed for, and
ordinary ones — scored over the whole set, so a step can be chosen without reading the test
set; the test split then reports it.

And a third: ``path`` (M > 0) unlearns along a path of M small natural-gradient steps per decade
of accumulated step, the query gradient recomputed at each point (``studies.scoring.score_path``),
instead of one step; each factor is where the path's accumulated step reaches it.  The
question it answers: is the rankings' dependence on the step a property of unlearning the query
that far, or of taking one large linear step there?  Its files and summary live in
``out/path<M>/``, beside the one-step study's.

And a fourth: ``even`` scores every factor both ways — the ascent θ0 + η·d that AbU takes and
the descent θ0 − η·d — and ranks by the EVEN part of the loss change,
    E_j(η) = ½·[ΔL_j(+η) + ΔL_j(−η)] = ½·η²·dᵀ∇²L_j·d + O(η⁴),
in which the first-order term g_jᵀd (a near-zero-mean gradient of an item the generator has
fit, the part that dominates small steps) cancels exactly.  What is left is the loss's
curvature along the unlearning direction: how much item j depends on the parameters the query's
unlearning moves.  Its ranking is free of η up to the fourth-order term, so the question it
answers is whether a teacher that finds the planted concepts can have rankings that do not move
with the step.  The descents' files sit beside the ascents' (``f-<factor>/``; the ascents are
the one-step study's own files); the summary is ``steps[_val]_even.json``.  The even part
shrinks as η², so at small enough factors it sinks into the float32 rounding of the losses:
on the smoke world it stops shrinking at a mean size of ≈ 4·10⁻⁸ (factors ≤ 10⁻³), on the toy
world at ≈ 1.2·10⁻⁹ (factor 10⁻⁵), where at 10⁻³ it is ~400× that on a validation-concept
query but only ~8× on an ordinary one (docs/results.md): read factors ≤ 10⁻³ with care.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attribution.callbacks import map_at_ks, map_by_type
from attribution.common.files import Dirs, atomic_save_npy, atomic_write_bytes
from attribution.common.plain import to_dict
from attribution.config import planted_for, val_concept_rows
from attribution.counterfactual.study_files import load_row, query_file, study_dir, summary_name
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet, study_query_set
from attribution.metrics import standard_error
from attribution.studies.scoring import score_at, score_path
from attribution.studies.steps_figure import step_figure
from attribution.studies.steps_table import format_steps
from attribution.teacher.evaluate import planted_known_answers, planted_mask
from attribution.teacher.run import build_scorer, make_queries
from attribution.teacher.scorer import Query

FACTORS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)








def study_rows(cfg, dirs: Dirs, split: str, n_queries: int | None) -> list[int]:
    """The query rows the study scores.  ``test``: the first ``n_queries`` test queries (default
    all) — for reporting.  ``val``: for CHOOSING the step without the test set — every training
    query that prompts a validation concept (``world.planted[i].queries: val``: their planted
    items are the known answers) and the first ordinary training queries, ``n_queries`` in all
    (default 12 + the concept queries), each scored over the whole training set."""
    if study_query_set(split) == "test":
        n = len(QuerySet(dirs["queries"] / "query_test"))
        return list(range(n if n_queries is None else min(n_queries, n)))
    held = val_concept_rows(cfg)
    n_ord = 12 if n_queries is None else max(0, n_queries - len(held))
    ordinary = [i for i in range(cfg.queries.n_train) if i not in set(held)][:n_ord]
    return sorted(ordinary + held)


Setting = tuple[float, float | None]  # (step factor, damping; None = the configured damping)


def score_factors(cfg, dirs: Dirs, out: Path, settings: list[Setting], rows: list[int],
                  split: str = "test", progress: bool = True, path: int = 0) -> dict:
    """Influence over all items of query ``rows`` of ``split`` at every (factor, damping);
    cached per (setting, query) under ``out/f<factor>[-d<damping>]/``; ``path`` > 0: along an
    unlearning path of that many steps per decade (``out`` is then the path's own folder).
    -> {setting: (influences (Q, N), metas)}."""
    out.mkdir(parents=True, exist_ok=True)
    n_items = len(CaptionedImageSet(dirs["world"], verify=False))
    scorer = queries = None
    preconds: dict = {}
    results: dict[Setting, tuple[list, list]] = {s: ([], []) for s in settings}
    bar = tqdm(rows, desc=f"step study ({split})", disable=not progress)
    for qid in bar:
        paths = {s: query_file(out, s[0], qid, s[1], split) for s in settings}
        todo = [s for s in settings if not paths[s].is_file()]
        if todo:
            if scorer is None:  # the base losses L_j(θ0) are the teacher's own (cached there)
                scorer, cands = build_scorer(cfg, dirs["world"], dirs["text"],
                                             dirs["generator"], dirs["fisher"], dirs["teacher"])
                queries = {q.query_id: q for q in make_queries(cfg, dirs["queries"], cands,
                                                               dirs["teacher"])
                           if q.split == study_query_set(split)}
                everything = torch.arange(len(cands))
            q = queries[qid]
            if split == "val":  # a training query, scored over every item (not its K-set)
                q = Query(q.split, q.query_id, q.z, q.cond, everything)
            for _, d in todo:
                if d not in preconds:
                    preconds[d] = (scorer.precondition if d is None
                                   else scorer.precondition.with_damping(d))
            if path:  # one path per damping; its results come back in increasing η
                walked: dict[Setting, dict] = {}
                for d in dict.fromkeys(d for _, d in todo):
                    group = sorted(f for f, e in todo if e == d)
                    along = score_path(scorer, q, [cfg.teacher.eta * f for f in group], path,
                                              preconds[d])
                    walked.update({(f, d): r for f, r in zip(group, along)})
                found = [walked[s] for s in todo]
            else:
                found = score_at(scorer, q, [cfg.teacher.eta * f for f, _ in todo],
                                        [preconds[d] for _, d in todo])
            for s, r in zip(todo, found):
                paths[s].parent.mkdir(parents=True, exist_ok=True)
                influence = r["influence"].detach().cpu().numpy().astype(np.float32)
                atomic_write_bytes(paths[s].with_suffix(".json"), json.dumps(
                    {k: r[k] for k in ("query_loss_before", "query_loss_after", "seconds",
                                       "path_steps") if k in r}
                ).encode())
                atomic_save_npy(paths[s], influence)
        for s in settings:
            row, meta = load_row(paths[s], n_items)
            results[s][0].append(row)
            results[s][1].append(meta)
    return {s: (np.stack(r), m) for s, (r, m) in results.items()}


def summarize(cfg, dirs: Dirs, scored: dict, k: int = 10, split: str = "test",
              rows_scored: list[int] | None = None, path: int = 0, even: bool = False) -> dict:
    """The study's table: per (damping, factor) the loss rise, share of items rising, planted
    recall and agreement (see the module docstring), each over the scored queries with s.e.
    ``even``: ``scored`` holds the even parts (``even_part``): the loss rise is the ascent's,
    "items rising" the share with positive curvature along the step.
    Agreement "vs next" is with the next larger factor at the same damping; "vs teacher" is
    with the configured teacher (test: its stored ranking; val: factor 1 at the configured
    damping, when scored; for a ``path`` or ``even`` study on val, added by
    ``_add_one_step_agreement``)."""
    settings = sorted(scored, key=lambda s: (-1.0 if s[1] is None else s[1], s[0]))
    ranks = {s: np.argsort(-scored[s][0], axis=1, kind="stable") for s in settings}
    q = len(next(iter(ranks.values())))
    rows_scored = list(range(q)) if rows_scored is None else list(rows_scored)
    world = CaptionedImageSet(dirs["world"], verify=False)
    queries = QuerySet(dirs["queries"] / f"query_{study_query_set(split)}")
    attributes = [queries.attributes[i] for i in rows_scored] if queries.attributes else []
    if split == "test":
        with np.load(dirs["teacher"] / "teacher_test.npz") as merged:
            teacher = merged["rank"][rows_scored]
        planted = [to_dict(p) for p in planted_for(cfg.world, "test")]
    else:  # a path's or even study's "vs teacher" is the ONE-step teacher's, added after
        teacher = None if path or even else ranks.get((1.0, None))  # (_add_one_step_agreement)
        planted = [to_dict(p) for p in planted_for(cfg.world, "val")]
    # agreement "vs next" also on each query kind apart: a prompt that names a planted concept
    # (a known answer) and an ordinary one can differ in how stable their top k is
    mask = planted_mask(attributes, planted) if attributes else np.zeros(q, bool)
    kinds = {"planted": mask, "ordinary": ~mask} if mask.any() and (~mask).any() else {}
    damping = cfg.teacher.damping
    known = {s: planted_known_answers(world.attributes, attributes, ranks[s], planted)
             for s in settings}
    rows = [_study_row(cfg, s, scored[s], ranks, settings, known[s], teacher, kinds, k)
            for s in settings]
    exact = bool(split == "test" and (1.0, None) in scored and not path and not even
                 and np.array_equal(ranks[(1.0, None)], teacher))
    return {"k": k, "split": split, "queries": q, "rows_scored": rows_scored,
            "n_items": len(world), "eta": cfg.teacher.eta, "gain": cfg.teacher.gain,
            "damping": damping, "fisher": cfg.teacher.fisher,
            "estimator": cfg.teacher.estimator, "rows": rows,
            "path": path, "even": even, "factor_1_reproduces_teacher": exact,
            "query_kinds": {kind: int(m.sum()) for kind, m in kinds.items()}}


def _study_row(cfg, s: tuple, scored_s: tuple, ranks: dict, settings: list, known: dict,
               teacher, kinds: dict, k: int) -> dict:
    """One (factor, damping) row of the study's table (:func:`summarize`)."""
    f, d = s
    infl, metas = scored_s
    rise = np.array([m["query_loss_after"] - m["query_loss_before"] for m in metas])
    before = np.array([m["query_loss_before"] for m in metas])
    share = (infl > 0).mean(axis=1)
    row = {"factor": f, "damping": cfg.teacher.damping if d is None else d,
           "eta": cfg.teacher.eta * f, "queries": len(ranks[s]),
           "query_loss_rise": float(rise.mean()), "query_loss_rise_stderr": standard_error(rise),
           "relative_query_loss_rise": float((rise / before).mean()),
           "share_items_rising": float(share.mean()),
           "share_items_rising_stderr": standard_error(share)}
    row.update({f"{name} recall@10": r["recall@10"] for name, r in known.items()})
    if teacher is not None:
        vs_teacher = map_at_ks(ranks[s], teacher, [k])
        row[f"vs_teacher.mAP@{k}"] = vs_teacher[f"mAP@{k}"]
        row[f"vs_teacher.mAP@{k}_stderr"] = vs_teacher[f"mAP@{k}_stderr"]
    larger = sorted(g for g, e in settings if e == d and g > f)
    if larger:
        nxt = map_at_ks(ranks[s], ranks[(larger[0], d)], [k])
        row[f"vs_next.mAP@{k}"] = nxt[f"mAP@{k}"]
        row[f"vs_next.mAP@{k}_stderr"] = nxt[f"mAP@{k}_stderr"]
        row["next_factor"] = larger[0]
        row.update({f"vs_next.{key}": v for key, v in map_by_type(
            ranks[s], ranks[(larger[0], d)], [k], kinds).items()})
    return row


def _add_one_step_agreement(summary: dict, scored: dict, one_step: Path, rows: list[int],
                            split: str, k: int) -> None:
    """A path (or even) study's rows gain ``vs_one_step.mAP@k``: agreement with the ONE-step
    teacher at the same factor and damping (its top-k the positives), where the one-step study
    scored the same queries — does taking the step as a path (or ranking by the even part)
    change what is found?  On the val split "vs teacher" is the one-step configured teacher's
    too (test: the stored teacher already).  ``scored``: what the study ranks by."""
    n = next(iter(scored.values()))[0].shape[1]
    damping = summary["damping"]

    def one_step_ranks(factor: float, d: float | None) -> np.ndarray | None:
        files = [query_file(one_step, factor, qid, d, split) for qid in rows]
        if not all(f.is_file() for f in files):
            return None
        return np.argsort(-np.stack([load_row(f, n)[0] for f in files]), axis=1, kind="stable")

    teacher = one_step_ranks(1.0, None) if split != "test" else None
    for row in summary["rows"]:
        d = None if row["damping"] == damping else row["damping"]
        mine = np.argsort(-scored[(row["factor"], d)][0], axis=1, kind="stable")
        for key, other in (("vs_one_step", one_step_ranks(row["factor"], d)),
                           ("vs_teacher", teacher)):
            if other is not None:
                agree = map_at_ks(mine, other, [k])
                row[f"{key}.mAP@{k}"] = agree[f"mAP@{k}"]
                row[f"{key}.mAP@{k}_stderr"] = agree[f"mAP@{k}_stderr"]




def even_part(scored: dict) -> dict:
    """{(factor, damping): (½·[ΔL(+factor) + ΔL(−factor)] (Q, N), the ascent's metas)} for
    every positive factor scored both ways (see the module docstring)."""
    out = {}
    for (f, d), (infl, metas) in scored.items():
        if f > 0 and (-f, d) in scored:
            out[(f, d)] = (0.5 * (infl + scored[(-f, d)][0]), metas)
    return out




def run_step_study(cfg, dirs: Dirs, out: Path, factors: list[float] | None = None,
                   n_queries: int | None = None, k: int = 10, progress: bool = True,
                   dampings: list[float] | None = None, split: str = "test",
                   path: int = 0, even: bool = False) -> dict:
    """Score, summarize, write ``summary_name(split, even)`` (``steps.json`` for the test
    split's one-step study) in ``study_dir(out, path)``; return the summary.  ``dampings``: the
    same factors at other dampings too (the configured one is always included); ``path``: steps
    per decade of an unlearning path (0: the one-step teacher); ``even``: each factor scored
    both ways and ranked by the even part of the loss change (one step only)."""
    if path < 0:
        raise ValueError(f"path steps per decade must be ≥ 0 (0: one step), got {path}")
    if even and path:
        raise ValueError("the even part is taken of one step each way (--even), not of a "
                         "path (--path): ask for one of them")
    if path and cfg.teacher.estimator != "ascent":
        raise ValueError("an unlearning path (--path) walks the exact ascent; this teacher "
                         f"scores by its {cfg.teacher.estimator} model: run the path study "
                         "with teacher.estimator=ascent")
    out = study_dir(out, path)
    factors = sorted(set(factors or FACTORS))
    extra = sorted({float(d) for d in (dampings or [])} - {float(cfg.teacher.damping)})
    if any(not np.isfinite(f) or f <= 0 for f in list(factors) + extra):
        raise ValueError(f"step factors and dampings must be positive numbers, got "
                         f"{factors}, {extra}")
    signs = (1.0, -1.0) if even else (1.0,)
    settings = [(sign * f, d) for d in [None, *extra] for f in factors for sign in signs]
    rows = study_rows(cfg, dirs, split, n_queries)
    if not rows:
        raise ValueError(f"the {split} split has no queries to study")
    with torch.no_grad():
        scored = score_factors(cfg, dirs, out, settings, rows, split, progress, path)
    ranked = even_part(scored) if even else scored
    summary = summarize(cfg, dirs, ranked, k, split, rows, path, even)
    if path or even:  # the one-step study's folder: the path's parent, or the even's own
        _add_one_step_agreement(summary, ranked, study_dir(out.parent) if path else out, rows,
                                split, k)
    atomic_write_bytes(out / summary_name(split, even), json.dumps(summary, indent=2).encode())
    write_fragment(summary, out / summary_name(split, even))
    return summary


def fragment_of(out: Path, split: str = "test", even: bool = False, path: int = 0) -> Path:
    """The report fragment (``<summary stem>.report.md``, its figure ``.png`` beside) a study
    with these settings writes in ``out`` (the study folder of :func:`run_step_study`)."""
    return study_dir(out, path) / summary_name(split, even).replace(".json", ".report.md")


def write_fragment(summary: dict, path: Path) -> Path:
    """The study's figure and table as a report fragment beside its summary ``path``
    (``<stem>.png``, ``<stem>.report.md``): the run's report includes every fragment under its
    study folder as text, so the core never imports the studies."""
    stem = path.with_suffix("")
    png = step_figure(summary, stem.with_suffix(".png"))
    text = "\n".join(["```", format_steps(summary), "```", "",
                      f"![teacher step size]({png.name})", ""])
    fragment = stem.with_suffix(".report.md")
    atomic_write_bytes(fragment, text.encode())
    return fragment
