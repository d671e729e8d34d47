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
(``teacher/steps.py``; run ``attribution teacher steps`` first).  Retrained generators are cached by the set of removed items, so two methods that pick
the same items share one retraining, and a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from attribution.common.files import Dirs, atomic_write_bytes
from attribution.config import ConfigError, derive
from attribution.data.queries import QuerySet
from attribution.data.text_cache import TextTable
from attribution.generator.model import build_scheduler, load_unet
from attribution.generator.sampling import sample
from attribution.generator.train import train_generator
from attribution.metrics import standard_error
from attribution.student.deploy import student_test_ranks
from attribution.teacher.scorer import query_loss
from attribution.teacher.steps import load_row, query_file

METHODS_HELP = ("teacher | teacher@<step factor>[:<damping>] | student | random | dtrak | abu_diagonal | any "
                "features.spaces entry (raw similarity)")
NOISE_SEED_OFFSET = 7919  # ΔLoss draws: independent of the teacher's (seed) and the ceiling's


def method_ranks(cfg, dirs: Dirs, methods: list[str]) -> dict[str, np.ndarray]:
    """Test-query rankings (Q_test, N), most influential first, for each named method (from the
    finished teacher, student and baselines folders)."""
    with np.load(dirs["teacher"] / "teacher_test.npz") as merged:
        teacher = merged["rank"]
    q, n = teacher.shape
    out = {}
    for m in methods:
        if m == "teacher":
            out[m] = teacher
        elif m == "random":
            out[m] = np.stack([np.random.default_rng([cfg.seed, 97, i]).permutation(n)
                               for i in range(q)])
        elif m == "student":
            out[m] = student_test_ranks(cfg, dirs["features"], dirs["student"])
        elif m.startswith("teacher@"):
            out[m] = _step_ranks(dirs, m, q, n, float(cfg.teacher.damping))
        else:
            path = dirs["baselines"] / f"rank_{m}.npy"
            if not path.is_file():
                raise ConfigError(f"unknown method {m!r} or its baseline was not run ({path}); "
                                 f"methods: {METHODS_HELP}")
            out[m] = np.load(path)
    return out


def _step_ranks(dirs: Dirs, method: str, q: int, n: int,
                configured_damping: float) -> np.ndarray:
    """``teacher@<factor>`` or ``teacher@<factor>:<damping>``: the step study's full-set
    ranking of each test query it scored; rows of queries it did not score are -1 (refused when
    such a query is asked for)."""
    try:
        spec = method.split("@", 1)[1]
        factor_text, _, damping_text = spec.partition(":")
        factor = float(factor_text)
        damping = float(damping_text) if damping_text else None
    except ValueError:
        raise ConfigError(f"{method!r}: write teacher@<step factor>[:<damping>], e.g. "
                          f"teacher@0.01 or teacher@0.001:0.01") from None
    out = np.full((q, n), -1, dtype=np.int64)
    for i in range(q):
        path = query_file(dirs.get("steps", ""), factor, i,
                          None if damping in (None, configured_damping) else damping)
        if path.is_file():
            out[i] = np.argsort(-load_row(path, n)[0], kind="stable")
    return out


def _removal_key(items: np.ndarray) -> str:
    return hashlib.sha256(",".join(map(str, sorted(items.tolist()))).encode()).hexdigest()[:12]


def result_file(cfg, out: Path, steps: int | None = None) -> Path:
    """``counterfactual.json`` for retrains as long as the generator's own schedule,
    ``counterfactual_s<steps>.json`` for a shorter one (both can live side by side: the
    schedule comparison reads the two)."""
    if steps is None or steps == cfg.generator.train.steps:
        return Path(out) / "counterfactual.json"
    return Path(out) / f"counterfactual_s{steps}.json"


def run_counterfactual(cfg, dirs: Dirs, out: Path, methods: list[str], queries: list[int],
                       k: int, progress: bool = True, echo=print,
                       steps: int | None = None) -> Path:
    """Retrain without each method's top-``k`` for each test query; write ``result_file``
    (per method: mean ΔLoss and image distance with standard errors over queries, per-query
    rows) in ``out``; return it.  ``dirs``: the finished world, text, generator, queries,
    features, teacher, student and baselines folders.

    ``steps``: retrain on a shorter schedule (cheaper); the reference is then the generator
    retrained on that same schedule with nothing removed, not the pipeline's generator."""
    ranks = method_ranks(cfg, dirs, methods)
    n_test = next(iter(ranks.values())).shape[0]
    if len(set(queries)) != len(queries):
        raise ConfigError(f"test queries {queries} repeat an id")
    bad = [q for q in queries if not 0 <= q < n_test]
    if bad:
        raise ConfigError(f"test queries {bad} out of range (there are {n_test})")
    out.mkdir(parents=True, exist_ok=True)
    qs = QuerySet(dirs["queries"] / "query_test", need_embeddings=True)
    alphas = build_scheduler(cfg.generator).alphas_cumprod
    train_cfg = cfg
    if steps is not None:
        train_cfg = derive(cfg, {"generator": {"train": {"steps": steps}}})
    tag = f"s{train_cfg.generator.train.steps}-crn-"  # crn: common random numbers (module.py)

    def generator_without(removed: np.ndarray, label: str) -> Path:
        gdir = out / "generators" / (tag + _removal_key(removed))
        if not (gdir / "generator.json").is_file():
            echo(f"[counterfactual] {label}: retraining without {len(removed)} items -> {gdir}")
            train_generator(train_cfg, dirs["world"], dirs["text"], gdir, progress,
                            exclude=removed.tolist())
        return gdir

    ref_dir = dirs["generator"] if steps is None else generator_without(
        np.zeros(0, dtype=np.int64), "reference")
    base_unet, _ = load_unet(ref_dir)
    uncond = TextTable.load(dirs["text"]).lookup(torch.tensor([0]))[0]
    sc = cfg.queries.sampling
    draws = cfg.teacher.query_draws

    def measure(unet, q: int) -> tuple[float, torch.Tensor]:
        z = torch.from_numpy(np.asarray(qs.latents[q])).float()
        cond = torch.from_numpy(np.asarray(qs.text_embeddings[q])).float()
        loss = query_loss(unet.eval(), alphas, z, cond, q, draws, cfg.seed + NOISE_SEED_OFFSET)
        regen = sample(unet, build_scheduler(cfg.generator), cond[None], uncond,
                       [1_000_000 + q], tuple(z.shape), seed=sc.seed, sampler=sc.sampler,
                       steps=sc.steps, guidance=sc.guidance, progress=False)[0]
        return loss, regen

    rows = []
    for m in methods:
        missing = [q for q in queries if ranks[m][q, 0] < 0]
        if missing:
            raise ConfigError(f"{m}: the step study has not scored test queries {missing}; run "
                              f"`attribution teacher steps CONFIG --factors "
                              f"{m.split('@')[1].replace(':', ' --dampings ')}`")
    for q in queries:  # query-major: a run cut short still covers every method on its queries
        base_loss, base_img = measure(base_unet, q)
        for m in methods:
            removed = ranks[m][q, :k]
            unet, _ = load_unet(generator_without(removed, f"{m} q{q}"))
            loss, regen = measure(unet, q)
            rows.append({"method": m, "query": q, "removed": removed.tolist(),
                         "delta_loss": loss - base_loss,
                         "image_distance": float((regen - base_img).pow(2).mean())})
        done = queries[:queries.index(q) + 1]
        result = {"k": k, "queries": done, "queries_asked": queries, "complete": q == queries[-1],
                  "steps": train_cfg.generator.train.steps, "reference": str(ref_dir),
                  "noise": f"fresh: seed + {NOISE_SEED_OFFSET}",
                  "methods": summarize(rows, methods), "rows": rows}
        atomic_write_bytes(result_file(cfg, out, steps), json.dumps(result, indent=2).encode())
    return out


def _separated(d: np.ndarray) -> bool:
    """A paired difference beyond 2 standard errors (never with fewer than 2 queries)."""
    return bool(len(d) > 1 and abs(d.mean()) > 2 * standard_error(d))


def summarize(rows: list[dict], methods: list[str]) -> dict:
    """Per method: mean ΔLoss / image distance with standard errors over its queries, and the
    paired differences (same queries) from the random control and from the teacher, where
    those were run; ``separated`` says whether a difference is beyond 2 standard errors."""
    summary = {}
    by = {(r["method"], r["query"]): r for r in rows}
    for m in methods:
        r = [row for row in rows if row["method"] == m]
        entry = {"queries": len(r)}
        for key in ("delta_loss", "image_distance"):
            v = np.array([row[key] for row in r])
            entry[key] = float(v.mean())
            entry[f"{key}_stderr"] = standard_error(v)
        if m != "random" and all(("random", row["query"]) in by for row in r):
            d = np.array([row["delta_loss"] - by[("random", row["query"])]["delta_loss"]
                          for row in r])
            entry["vs_random"], entry["vs_random_stderr"] = float(d.mean()), standard_error(d)
            entry["wins_vs_random"] = int((d > 0).sum())
            entry["separated_from_random"] = _separated(d)
        if m != "teacher" and r and all(("teacher", row["query"]) in by for row in r):
            d = np.array([row["delta_loss"] - by[("teacher", row["query"])]["delta_loss"]
                          for row in r])
            entry["vs_teacher"], entry["vs_teacher_stderr"] = float(d.mean()), standard_error(d)
            entry["separated_from_teacher"] = _separated(d)
        summary[m] = entry
    return summary


def format_counterfactual(result: dict) -> str:
    asked = result.get("queries_asked", result["queries"])
    partial = "" if len(asked) == len(result["queries"]) else \
        f" (of {len(asked)} asked: the run was cut short; rerun the command to go on)"
    lines = [f"leave-{result['k']}-out over {len(result['queries'])} test queries{partial}, "
             f"generators retrained {result['steps']} steps (mean ± s.e.; bigger = the removed "
             "items mattered more; vs random: paired difference on the same queries, and on how "
             "many queries it is > 0)",
             f"{'method':<24}{'ΔLoss':>11}{'± s.e.':>9}{'vs random':>11}{'± s.e.':>9}{'wins':>6}"
             f"{'vs teacher':>12}{'± s.e.':>9}{'image dist':>12}{'± s.e.':>9}"]
    ranked = sorted(result["methods"].items(), key=lambda kv: -kv[1]["delta_loss"])
    for m, r in ranked:
        vs = (f"{r['vs_random']:>11.5f}{r['vs_random_stderr']:>9.5f}"
              f"{r['wins_vs_random']:>3}/{r['queries']:<2}") if "vs_random" in r else " " * 26
        vt = (f"{r['vs_teacher']:>12.5f}{r['vs_teacher_stderr']:>9.5f}" if "vs_teacher" in r
              else " " * 21)
        lines.append(f"{m:<24}{r['delta_loss']:>11.5f}{r['delta_loss_stderr']:>9.5f}{vs}{vt}"
                     f"{r['image_distance']:>12.5f}{r['image_distance_stderr']:>9.5f}")
    apart = [m for m, r in ranked if r.get("separated_from_teacher")]
    same = [m for m, r in ranked if "vs_teacher" in r and not r.get("separated_from_teacher")]
    if same or apart:
        lines.append("within 2 s.e. of the teacher (cannot be told apart here): "
                     + (", ".join(same) or "none") + "; beyond: " + (", ".join(apart) or "none"))
    return "\n".join(lines)


def compare_schedules(full: dict, short: dict) -> dict:
    """Does the shorter retraining schedule rank methods as the full one does?  Over the
    (method, query) removals both results measured: the correlation of their ΔLoss (Pearson,
    and Spearman on ranks), and per pair of methods the paired difference under each schedule
    (same queries) with its standard error and whether the two agree in sign."""
    if full.get("k") != short.get("k"):
        raise ValueError(f"the two schedules removed different numbers of items "
                         f"(k = {full.get('k')} and {short.get('k')}): nothing to compare")
    a = {(r["method"], r["query"]): r["delta_loss"] for r in full["rows"]}
    b = {(r["method"], r["query"]): r["delta_loss"] for r in short["rows"]}
    keys = sorted(set(a) & set(b))
    if len(keys) < 3:
        raise ValueError(f"the two schedules share {len(keys)} (method, query) removals; "
                         f"need at least 3 to compare")
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])

    def ranks(v):
        return np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)

    methods = sorted({m for m, _ in keys})
    pairs = []
    for i, m1 in enumerate(methods):
        for m2 in methods[i + 1:]:
            qs = sorted({q for m, q in keys if m == m1} & {q for m, q in keys if m == m2})
            if len(qs) < 2:
                continue
            entry = {"a": m1, "b": m2, "queries": len(qs)}
            for name, d in (("full", a), ("short", b)):
                diff = np.array([d[(m1, q)] - d[(m2, q)] for q in qs])
                entry[name], entry[f"{name}_stderr"] = float(diff.mean()), standard_error(diff)
            entry["same_sign"] = bool(np.sign(entry["full"]) == np.sign(entry["short"]))
            pairs.append(entry)
    return {"removals": len(keys), "steps_full": full["steps"], "steps_short": short["steps"],
            "pearson": float(np.corrcoef(x, y)[0, 1]),
            "spearman": float(np.corrcoef(ranks(x), ranks(y))[0, 1]),
            "scale": float(np.sum(x * y) / max(np.sum(y * y), 1e-30)),  # full ≈ scale × short
            "pairs": pairs}


def format_schedules(c: dict) -> str:
    lines = [f"retraining {c['steps_short']} vs {c['steps_full']} steps over {c['removals']} "
             f"(method, query) removals: ΔLoss correlation Pearson {c['pearson']:.3f}, "
             f"Spearman {c['spearman']:.3f}; full ≈ {c['scale']:.2f} × short",
             f"{'pair (a − b)':<36}{'full':>11}{'± s.e.':>9}{'short':>11}{'± s.e.':>9}"
             f"{'same sign':>11}"]
    for p in c["pairs"]:
        lines.append(f"{p['a'] + ' − ' + p['b']:<36}{p['full']:>11.5f}{p['full_stderr']:>9.5f}"
                     f"{p['short']:>11.5f}{p['short_stderr']:>9.5f}{str(p['same_sign']):>11}")
    return "\n".join(lines)
