"""Leave-K-out counterfactual evaluation (docs/method.md §4): does removing a method's top-K matter?

For every method and test query: retrain the generator from scratch without the method's top-K
training items (same seed, same schedule; every random choice of a step is a function of
(seed, step), so only the removed items change what is learned), then measure

- ΔLoss: the query's denoising loss under the retrained generator minus under the original, with
  the same fixed (t, ε) draws for both — FRESH draws (scoring seed + ``NOISE_SEED_OFFSET``), not
  the ones the teacher's unlearning step ascended on, which would favour the teacher;
- the regenerated image's distance from the original: sampled with the same prompt and the same
  per-sample noise, mean squared difference in model space.

A bigger rise means the removed items mattered more.  ``random`` (K items drawn uniformly) is the
control.  ``teacher@<factor>[:<damping>]`` is the teacher at a multiple of its step (and another damping), from the step-size study
(``attribution study teacher-steps`` first; its files: ``study_files.py``); ``teacher-even@…`` ranks by the
even part of the loss change at that step (the study's ``--even``); ``teacher-gn`` by its
step-free Gauss–Newton limit (``attribution study teacher-curvature``).  Retrained generators are cached by
the set of removed items in a folder keyed by the generator alone (``dirs["retrained"]``), so two
methods that pick the same items share one retraining — also across teachers, students and
baselines of one generator — and a killed run resumes.

Two splits.  ``test`` (the default) reports.  ``val`` measures on TRAINING queries — the ones the
step study's choosing split scored over the whole set (``attribution study teacher-steps
CONFIG --split val``): the queries that prompt a validation concept, whose planted items are known
answers, and ordinary ones — so that retraining can judge the teacher's step without reading
the test set.  On ``val`` the methods are the teacher (the study's factor 1), ``teacher@…`` and
``random``: the student was trained on these queries and the baselines rank test queries only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from attribution.common.files import Dirs, atomic_write_bytes
from attribution.config import ConfigError, derive, to_dict
from attribution.counterfactual.results import query_split, result_file, summarize
from attribution.counterfactual.study_files import gn_ranks, query_file, ranks_from_rows
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.data.text_cache import TextTable
from attribution.generator.model import build_scheduler, load_unet
from attribution.generator.sampling import sample
from attribution.generator.train import train_generator
from attribution.student.deploy import student_test_ranks
from attribution.teacher.evaluate import known_sources
from attribution.teacher.scorer import query_loss

METHODS_HELP = ("teacher | teacher@<step factor>[:<damping>] | teacher-even@<step factor>[:<damping>] "
                "| teacher-gn | student | random | dtrak | abu_diagonal | any "
                "features.spaces entry (raw similarity)")
STEP_METHODS = ("teacher@", "teacher-even@")  # read from the step study's files
NOISE_SEED_OFFSET = 7919  # ΔLoss draws: independent of the teacher's (seed) and the ceiling's
VAL_METHODS = ("teacher, teacher@<factor>[:<damping>], teacher-even@<factor>[:<damping>], "
               "teacher-gn and random")


def method_ranks(cfg, dirs: Dirs, methods: list[str], split: str = "test"
                 ) -> dict[str, np.ndarray]:
    """Rankings (Q, N), most influential first, for each named method: on ``test`` from the
    finished teacher, student and baselines folders; on ``val`` (rows = training query ids)
    from the step study's choosing split, rows it did not score -1."""
    if query_split(split) == "test":
        with np.load(dirs["teacher"] / "teacher_test.npz") as merged:
            teacher = merged["rank"]
        q, n = teacher.shape
    else:
        q = len(QuerySet(dirs["queries"] / "query_train"))
        n = len(CaptionedImageSet(dirs["world"], verify=False))
    damping = float(cfg.teacher.damping)
    out = {}
    for m in methods:
        if m == "teacher":
            out[m] = teacher if split == "test" else _step_ranks(dirs, "teacher@1", q, n,
                                                                 damping, split)
        elif m == "random":  # the val split draws its own stream (its rows are other queries)
            stream = [cfg.seed, 97] if split == "test" else [cfg.seed, 98]
            out[m] = np.stack([np.random.default_rng([*stream, i]).permutation(n)
                               for i in range(q)])
        elif m.startswith(STEP_METHODS):
            out[m] = _step_ranks(dirs, m, q, n, damping, split)
        elif m == "teacher-gn":  # the step-free curvature (``attribution study teacher-curvature``)
            out[m] = gn_ranks(dirs.get("steps", ""), q, n, split)
        elif split != "test":
            raise ConfigError(f"method {m!r} on the val split: it has {VAL_METHODS} (the "
                              "student was trained on these queries; baselines rank test "
                              "queries only)")
        elif m == "student":
            out[m] = student_test_ranks(cfg, dirs["features"], dirs["student"])
        else:
            path = dirs["baselines"] / f"rank_{m}.npy"
            if not path.is_file():
                raise ConfigError(f"unknown method {m!r} or its baseline was not run ({path}); "
                                 f"methods: {METHODS_HELP}")
            out[m] = np.load(path)
    return out


def _step_ranks(dirs: Dirs, method: str, q: int, n: int,
                configured_damping: float, split: str = "test") -> np.ndarray:
    """``teacher@<factor>`` or ``teacher@<factor>:<damping>``: the step study's full-set
    ranking of each query of ``split`` it scored; rows of queries it did not score are -1
    (refused when such a query is asked for).  ``teacher-even@…``: ranked by the even part
    ½[ΔL(+factor) + ΔL(−factor)] (the study's ``--even`` files, both signs needed)."""
    try:
        spec = method.split("@", 1)[1]
        factor_text, _, damping_text = spec.partition(":")
        factor = float(factor_text)
        damping = float(damping_text) if damping_text else None
    except ValueError:
        raise ConfigError(f"{method!r}: write teacher@<step factor>[:<damping>], e.g. "
                          f"teacher@0.01 or teacher@0.001:0.01 (or teacher-even@…)") from None
    signs = (1.0, -1.0) if method.startswith("teacher-even@") else (1.0,)
    d = None if damping in (None, configured_damping) else damping
    return ranks_from_rows(lambda i: [query_file(dirs.get("steps", ""), sign * factor, i, d,
                                                 split) for sign in signs], q, n)


def _known(cfg, world_dir: Path, qs: QuerySet) -> list[dict[str, set[int]]]:
    """Per query of ``qs``, the planted training items of each concept it prompts (its known
    answers; empty for ordinary queries and worlds without attributes)."""
    if cfg.world.kind != "toy" or qs.attributes is None or not cfg.world.planted:
        return [{} for _ in range(len(qs))]
    items = CaptionedImageSet(world_dir, verify=False).attributes
    return known_sources(items, qs.attributes, [to_dict(p) for p in cfg.world.planted])


def _removal_key(items: np.ndarray) -> str:
    return hashlib.sha256(",".join(map(str, sorted(items.tolist()))).encode()).hexdigest()[:12]


def _check_queries(queries: list[int], n_rows: int, which: str) -> None:
    if len(set(queries)) != len(queries):
        raise ConfigError(f"{which} queries {queries} repeat an id")
    bad = [q for q in queries if not 0 <= q < n_rows]
    if bad:
        raise ConfigError(f"{which} queries {bad} out of range (there are {n_rows})")


def _check_ranked(ranks: dict, methods: list[str], queries: list[int], which: str,
                  split: str) -> None:
    """Every method has a ranking of every query asked for, or one line saying what to run."""
    for m in methods:
        missing = [q for q in queries if ranks[m][q, 0] < 0]
        if missing and m == "teacher-gn":
            raise ConfigError(f"{m}: no curvature scores for {which} queries {missing}; run "
                              "`attribution study teacher-curvature CONFIG"
                              + (" --split val`" if split == "val" else "`"))
        if missing:
            spec = m.split("@")[1] if "@" in m else "1"
            raise ConfigError(f"{m}: the step study has not scored {which} queries {missing}; "
                              f"run `attribution study teacher-steps CONFIG --factors "
                              f"{spec.replace(':', ' --dampings ')}"
                              + (" --even" if m.startswith("teacher-even@") else "")
                              + (" --split val`" if split == "val" else "`")
                              + (" (its val split scores the validation-concept training "
                                 "queries and the first ordinary ones; --queries N for more)"
                                 if split == "val" else ""))


class Retrainer:
    """Generators retrained without a set of items (cached by the set), and what a query
    measures on one: its denoising loss under fresh noise and its regenerated image."""

    def __init__(self, cfg, dirs: Dirs, out: Path, qs: QuerySet, steps: int | None,
                 progress: bool, echo):
        self.cfg, self.dirs, self.out, self.qs = cfg, dirs, out, qs
        self.progress, self.echo = progress, echo
        self.train_cfg = cfg if steps is None else derive(
            cfg, {"generator": {"train": {"steps": steps}}})
        self.tag = f"s{self.train_cfg.generator.train.steps}-crn-"  # common random numbers
        self.alphas = build_scheduler(cfg.generator).alphas_cumprod
        self.uncond = TextTable.load(dirs["text"]).lookup(torch.tensor([0]))[0]

    def without(self, removed: np.ndarray, label: str) -> Path:
        name = self.tag + _removal_key(removed)
        gdir = self.dirs.get("retrained", self.out / "generators") / name
        if (self.out / "generators" / name / "generator.json").is_file():  # an older cache
            return self.out / "generators" / name
        if not (gdir / "generator.json").is_file():
            self.echo(f"[counterfactual] {label}: retraining without {len(removed)} items "
                      f"-> {gdir}")
            train_generator(self.train_cfg, self.dirs["world"], self.dirs["text"], gdir,
                            self.progress, exclude=removed.tolist())
        return gdir

    def measure(self, unet, q: int) -> tuple[float, torch.Tensor]:
        cfg, sc = self.cfg, self.cfg.queries.sampling
        z = torch.from_numpy(np.asarray(self.qs.latents[q])).float()
        cond = torch.from_numpy(np.asarray(self.qs.text_embeddings[q])).float()
        loss = query_loss(unet.eval(), self.alphas, z, cond, q, cfg.teacher.query_draws,
                          cfg.seed + NOISE_SEED_OFFSET)
        regen = sample(unet, build_scheduler(cfg.generator), cond[None], self.uncond,
                       [1_000_000 + q], tuple(z.shape), seed=sc.seed, sampler=sc.sampler,
                       steps=sc.steps, guidance=sc.guidance, progress=False)[0]
        return loss, regen


def _row(m: str, q: int, removed: np.ndarray, loss: float, base_loss: float, regen, base_img,
         known: dict) -> dict:
    row = {"method": m, "query": q, "removed": removed.tolist(),
           "delta_loss": loss - base_loss,
           "image_distance": float((regen - base_img).pow(2).mean())}
    if known:  # a query that prompts a planted concept: how many sources went
        gone = set(removed.tolist())
        row["known"] = {c: [len(ids & gone), len(ids)] for c, ids in known.items()}
        every = set().union(*known.values())
        row["known_sources"], row["known_removed"] = len(every), len(every & gone)
    return row


def run_counterfactual(cfg, dirs: Dirs, out: Path, methods: list[str], queries: list[int],
                       k: int, progress: bool = True, echo=print,
                       steps: int | None = None, split: str = "test") -> Path:
    """Retrain without each method's top-``k`` for each query of ``split``; write
    ``result_file`` (per method: mean ΔLoss and image distance with standard errors over
    queries, per-query rows) in ``out``; return it.  ``dirs``: the finished world, text,
    generator, queries, features, teacher, student and baselines folders (and ``steps``, the
    step study's, for ``teacher@…`` and the val split).

    ``steps``: retrain on a shorter schedule (cheaper); the reference is then the generator
    retrained on that same schedule with nothing removed, not the pipeline's generator."""
    which = query_split(split)
    ranks = method_ranks(cfg, dirs, methods, split)
    _check_queries(queries, next(iter(ranks.values())).shape[0], which)
    _check_ranked(ranks, methods, queries, which, split)
    out.mkdir(parents=True, exist_ok=True)
    qs = QuerySet(dirs["queries"] / f"query_{which}", need_embeddings=True)
    known = _known(cfg, dirs["world"], qs)
    rt = Retrainer(cfg, dirs, out, qs, steps, progress, echo)
    ref_dir = dirs["generator"] if steps is None else rt.without(
        np.zeros(0, dtype=np.int64), "reference")
    base_unet, _ = load_unet(ref_dir)
    rows = []
    for q in queries:  # query-major: a run cut short still covers every method on its queries
        base_loss, base_img = rt.measure(base_unet, q)
        for m in methods:
            removed = ranks[m][q, :k]
            loss, regen = rt.measure(load_unet(rt.without(removed, f"{m} q{q}"))[0], q)
            rows.append(_row(m, q, removed, loss, base_loss, regen, base_img, known[q]))
        done = queries[:queries.index(q) + 1]
        result = {"k": k, "split": split, "queries": done, "queries_asked": queries,
                  "complete": q == queries[-1],
                  "steps": rt.train_cfg.generator.train.steps, "reference": str(ref_dir),
                  "noise": f"fresh: seed + {NOISE_SEED_OFFSET}",
                  "methods": summarize(rows, methods), "rows": rows}
        atomic_write_bytes(result_file(cfg, out, steps, split, k),
                           json.dumps(result, indent=2).encode())
    return out
