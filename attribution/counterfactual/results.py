"""Leave-K-out results: where each split and schedule's result lives, the per-method summary
(paired differences against random and the teacher), and whether a shorter retraining schedule
ranks the removals as the full one does (docs/method.md §4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attribution.config import ConfigError
from attribution.data.queries import STUDY_SPLITS as SPLITS
from attribution.data.queries import study_query_set
from attribution.metrics import standard_error


def query_split(split: str) -> str:
    """The query set a counterfactual split measures: test, or the training queries (val)."""
    try:
        return study_query_set(split)
    except ValueError as e:
        raise ConfigError(f"counterfactual {e}") from None


DEFAULT_K = 10  # the removal size whose results keep the plain file names


def result_file(cfg, out: Path, steps: int | None = None, split: str = "test",
                k: int = DEFAULT_K) -> Path:
    """``counterfactual.json`` for retrains as long as the generator's own schedule,
    ``counterfactual_s<steps>.json`` for a shorter one (both can live side by side: the
    schedule comparison reads the two); ``counterfactual_val[_s<steps>].json`` on the val
    split; ``..._k<k>.json`` for a removal size other than 10 (so another -k never replaces
    a result)."""
    query_split(split)
    stem = "counterfactual" if split == "test" else f"counterfactual_{split}"
    if steps is not None and steps != cfg.generator.train.steps:
        stem += f"_s{steps}"
    if k != DEFAULT_K:
        stem += f"_k{k}"
    return Path(out) / f"{stem}.json"


def _split_and_steps(path: Path) -> tuple[str, int | None]:
    """(split, shorter schedule's steps or None for the full one) of a ``result_file`` name."""
    split, steps, _ = _name_parts(path)
    return split, steps


def _name_parts(path: Path) -> tuple[str, int | None, int]:
    """(split, shorter schedule's steps or None, removal size k) of a ``result_file`` name."""
    rest = path.stem.removeprefix("counterfactual")
    split, k = "test", DEFAULT_K
    if rest.startswith("_val"):
        split, rest = "val", rest.removeprefix("_val")
    head, sep, tail = rest.rpartition("_k")
    if sep and tail.isdigit():
        rest, k = head, int(tail)
    steps = rest.removeprefix("_s")
    return split, int(steps) if steps.isdigit() else None, k


def result_files(out: Path) -> list[Path]:
    """Every finished (or cut-short) result in ``out``: test before val, and within a split
    the full-length schedule first, then the shorter ones by length."""
    def key(p: Path):
        split, steps, k = _name_parts(p)
        return SPLITS.index(split), k != DEFAULT_K, k, steps is not None, steps or 0

    return sorted(Path(out).glob("counterfactual*.json"), key=key)


def schedule_pairs(out: Path) -> list[dict]:
    """The full-length result of each split beside each shorter schedule of the same split:
    ``{"split", "short": file name, "comparison": compare_schedules(...) or None, "why": the
    reason it could not be compared, or ""}`` — what the CLI and the report print."""
    pairs = []
    everything = [p for p in result_files(out) if _name_parts(p)[2] == DEFAULT_K]
    for split in SPLITS:
        files = [p for p in everything if _split_and_steps(p)[0] == split]
        if not files or _split_and_steps(files[0])[1] is not None:
            continue  # no full-length result of this split: nothing to compare against
        reference = json.loads(files[0].read_text())
        for path in files[1:]:
            entry = {"split": split, "short": path.name, "comparison": None, "why": ""}
            try:
                entry["comparison"] = compare_schedules(reference, json.loads(path.read_text()))
            except ValueError as err:
                entry["why"] = str(err)
            pairs.append(entry)
    return pairs


def _separated(d: np.ndarray) -> bool:
    """A paired difference beyond 2 standard errors (never with fewer than 2 queries)."""
    return bool(len(d) > 1 and abs(d.mean()) > 2 * standard_error(d))


def _paired(r: list[dict], by: dict, other: str) -> np.ndarray | None:
    """ΔLoss of rows ``r`` minus ``other``'s on the same queries (None unless it ran on all)."""
    if not r or not all((other, row["query"]) in by for row in r):
        return None
    return np.array([row["delta_loss"] - by[(other, row["query"])]["delta_loss"] for row in r])


def _known_answers(r: list[dict], by: dict) -> dict:
    """A method's removals on the queries that prompt a planted concept (rows carrying
    ``known_removed``): how many of the concept's training items (its known sources) the top-k
    held, ΔLoss where it held every one and where it did not, and the paired difference from
    random on these queries alone; ``ordinary_vs_random`` the same difference on the others."""
    known = [row for row in r if "known_removed" in row]

    def split(pairs: list[tuple[int, int, float]]) -> dict:  # (removed, of, ΔLoss) per query
        every = [d for gone, total, d in pairs if gone == total]
        some = [d for gone, total, d in pairs if gone < total]
        return {"queries": len(pairs),
                "sources_removed": float(np.mean([gone / total for gone, total, _ in pairs])),
                "every_source_removed": len(every),
                "delta_loss_every": float(np.mean(every)) if every else None,
                "delta_loss_some": float(np.mean(some)) if some else None}

    out = split([(row["known_removed"], row["known_sources"], row["delta_loss"])
                 for row in known])
    concepts = sorted({c for row in known for c in row.get("known", {})})
    out["by_concept"] = {c: split([(*row["known"][c], row["delta_loss"]) for row in known
                                   if c in row.get("known", {})]) for c in concepts}
    if r[0]["method"] == "random":
        return out
    ordinary = [row for row in r if "known_removed" not in row]
    for prefix, subset in (("", known), ("ordinary_", ordinary)):
        d = _paired(subset, by, "random")
        if d is not None:
            out[f"{prefix}vs_random"] = float(d.mean())
            out[f"{prefix}vs_random_stderr"] = standard_error(d)
            out[f"{prefix}wins_vs_random"] = int((d > 0).sum())
    if ordinary and "ordinary_vs_random" in out:  # the known-answer count is ``queries``
        out["ordinary_queries"] = len(ordinary)
    return out


def summarize(rows: list[dict], methods: list[str]) -> dict:
    """Per method: mean ΔLoss / image distance with standard errors over its queries, and the
    paired differences (same queries) from the random control and from the teacher, where
    those were run; ``separated`` says whether a difference is beyond 2 standard errors;
    ``known_answers`` (where some queries prompt a planted concept): :func:`_known_answers`."""
    summary = {}
    by = {(r["method"], r["query"]): r for r in rows}
    for m in methods:
        r = [row for row in rows if row["method"] == m]
        entry = {"queries": len(r)}
        for key in ("delta_loss", "image_distance"):
            v = np.array([row[key] for row in r])
            entry[key] = float(v.mean())
            entry[f"{key}_stderr"] = standard_error(v)
        d = _paired(r, by, "random") if m != "random" else None
        if d is not None:
            entry["vs_random"], entry["vs_random_stderr"] = float(d.mean()), standard_error(d)
            entry["wins_vs_random"] = int((d > 0).sum())
            entry["separated_from_random"] = _separated(d)
        d = _paired(r, by, "teacher") if m != "teacher" else None
        if d is not None:
            entry["vs_teacher"], entry["vs_teacher_stderr"] = float(d.mean()), standard_error(d)
            entry["separated_from_teacher"] = _separated(d)
        if any("known_removed" in row for row in r):
            entry["known_answers"] = _known_answers(r, by)
        summary[m] = entry
    return summary


def format_counterfactual(result: dict) -> str:
    asked = result.get("queries_asked", result["queries"])
    partial = "" if len(asked) == len(result["queries"]) else \
        f" (of {len(asked)} asked: the run was cut short; rerun the command to go on)"
    what = ("test queries" if result.get("split", "test") == "test"
            else "training queries (the choosing split)")
    lines = [f"leave-{result['k']}-out over {len(result['queries'])} {what}{partial}, "
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
    lines += _format_known(ranked)
    apart = [m for m, r in ranked if r.get("separated_from_teacher")]
    same = [m for m, r in ranked if "vs_teacher" in r and not r.get("separated_from_teacher")]
    if same or apart:
        lines.append("within 2 s.e. of the teacher (cannot be told apart here): "
                     + (", ".join(same) or "none") + "; beyond: " + (", ".join(apart) or "none"))
    return "\n".join(lines)


def _format_known(ranked: list[tuple[str, dict]]) -> list[str]:
    """The known-answer lines of :func:`format_counterfactual` (none without planted queries)."""
    known = [(m, r["known_answers"]) for m, r in ranked if "known_answers" in r]
    if not known:
        return []

    def mean(v):
        return f"{v:>11.5f}" if v is not None else f"{'—':>11}"

    lines = [f"on the {known[0][1]['queries']} queries that prompt a planted concept (its "
             "training items are the known sources): share of them in the removed top-k, on how "
             "many queries all were removed, mean ΔLoss then and otherwise, paired vs random",
             f"{'method':<24}{'sources':>9}{'all':>6}{'ΔLoss all':>11}{'otherwise':>11}"
             f"{'vs random':>11}{'± s.e.':>9}{'wins':>6}{'ordinary vs random':>20}"]
    for m, k in known:
        vs = (f"{k['vs_random']:>11.5f}{k['vs_random_stderr']:>9.5f}"
              f"{k['wins_vs_random']:>3}/{k['queries']:<2}") if "vs_random" in k else " " * 26
        ordinary = (f"{k['ordinary_vs_random']:>11.5f} ± {k['ordinary_vs_random_stderr']:.5f}"
                    if "ordinary_vs_random" in k else "")
        lines.append(f"{m:<24}{k['sources_removed']:>9.2f}{k['every_source_removed']:>6}"
                     f"{mean(k['delta_loss_every'])}{mean(k['delta_loss_some'])}{vs}{ordinary}")
        for c, b in k.get("by_concept", {}).items():
            lines.append(f"{'  ' + c + ' (' + str(b['queries']) + ')':<24}"
                         f"{b['sources_removed']:>9.2f}{b['every_source_removed']:>6}"
                         f"{mean(b['delta_loss_every'])}{mean(b['delta_loss_some'])}")
    return lines


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


def format_schedule_pairs(pairs: list[dict]) -> str:
    """:func:`schedule_pairs` as text: each comparison's table, or why it could not be made."""
    blocks = []
    for p in pairs:
        head = f"[{p['split']} split: the full schedule vs {p['short']}]"
        blocks.append(head + "\n" + (format_schedules(p["comparison"]) if p["comparison"]
                                     else f"not compared: {p['why']}"))
    return "\n\n".join(blocks)
