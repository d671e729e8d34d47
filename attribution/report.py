"""``runs/<name>/report.md``: what a run produced, in one page a person reads.

Stage times and headline figures, the run's own figures (tuned vs untuned, quality vs
throughput), every sweep figure whose results exist, the teacher's known answers, the generator's
prompt fidelity, the paper's reference values beside ours (docs/method.md §5) and the resolved config.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attribution import figures
from attribution.abc.format import format_abc
from attribution.claims import check_claims, format_claims, stale_runs
from attribution.common.files import atomic_write_bytes
from attribution.config import ConfigError, derive, run_hash, to_dict
from attribution.counterfactual.results import (
    format_counterfactual,
    format_schedule_pairs,
    result_files,
    schedule_pairs,
)
from attribution.fidelity import format_fidelity
from attribution.report_html import write_report_html
from attribution.report_lead import methods_table, reading
from attribution.sweep_spec import run_dotlist
from attribution.teacher.evaluate import format_known_answers

# The paper's MSCOCO numbers (docs/method.md §5) that have a counterpart in every run.
PAPER_FEATURE_TUNING = {  # mAP@1000 before -> after tuning (Fig. 3 left)
    "dino": (0.456, 0.674), "clip_image": (0.333, 0.679), "clip_text": (0.329, 0.520),
    "dino+clip_text": (0.460, 0.724),
}
# Which paper space a toy space stands in for (same role: image / text / both).
TOY_COUNTERPART = {"toyclip_image": "clip_image", "pixels": "dino", "toyclip_text": "clip_text",
                   "minilm": "clip_text", "toyclip_image+minilm": "dino+clip_text"}
PAPER_QPS = {"student (ours)": 55.0, "AbU+": 1.2e-4, "untuned DINO+CLIP-text": 55.0}
PAPER_SPEEDUP_VS_ABU_PLUS = 400_000


def _f(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _stage_rows(pipe) -> list[str]:
    rows = ["| stage | seconds (when computed) | key figures | folder |", "|---|---:|---|---|"]
    for stage in pipe.order:
        info = pipe.finished(stage)  # read and verified (None: not run for this config)
        if info is None:
            continue
        figs = ", ".join(f"{k}={_f(v)}" for k, v in info["summary"].items()
                         if isinstance(v, int | float) and not isinstance(v, bool))[:160]
        rows.append(f"| {stage} | {info['seconds']:.1f} | {figs} | `{pipe.dir(stage).name}` |")
    return rows


def write_report(pipe, sweeps_dir: str | Path = "sweeps") -> Path:
    """Draw the run's figures and write ``runs/<name>/report.md``; return its path."""
    cfg = pipe.cfg
    root = pipe.root
    metrics = json.loads((root / "metrics.json").read_text())
    feature = cfg.student.feature
    ks = [k for k in cfg.student.k_eval if f"student.mAP@{k}" in metrics]
    k0 = ks[0]
    figdir = root / "figures"
    tuned = figures.tuned_vs_untuned(metrics, ks, feature, figdir / "tuned_vs_untuned.png")
    qvt = figures.quality_vs_throughput(figures.methods_of_run(metrics, k0), k0,
                                        figdir / "quality_vs_throughput.png")
    sweep_figs = {}
    if Path(sweeps_dir).is_dir():
        sweep_figs = figures.sweep_figures(sweeps_dir, Path(cfg.output_root) / "sweeps", figdir,
                                           echo=lambda s: None, experiment=cfg.name)
    base = [metrics.get(f"baseline.{feature}.mAP@{k}") for k in ks]
    stud = [metrics.get(f"student.mAP@{k}") for k in ks]
    verdict = ("tuned > untuned at every k" if all(s > b for s, b in zip(stud, base))
               else "tuned does NOT beat untuned at every k")
    L = [f"# Attribution run `{cfg.name}`", "",
         f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.machine()} "
         f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
         f"CUDA {'yes' if torch.cuda.is_available() else 'no'}), torch {torch.__version__}. "
         "Every test query's top items per method, to look at: [report.html](report.html).",
         "", reading(metrics, feature, k0), ""]
    L += methods_table(metrics, k0)
    L += [f"![quality vs throughput](figures/{qvt.name})", "",
          "Quality here is mAP against the teacher's own ranking (the teacher sits at 1 by "
          "construction); the counterfactual y-axis of the paper's Figure 1 (retraining without each "
          "method's top items) is the Counterfactual section below.", "",
          f"![tuned vs untuned](figures/{tuned.name})", "",
          f"Student on `{feature}`: {verdict} "
          f"({', '.join(f'mAP@{k} {b:.3f} -> {s:.3f}' for k, b, s in zip(ks, base, stud))}).",
          ""]
    L += _reference_table(metrics, feature, ks, cfg.world.kind)
    L += _claims(cfg, k0)
    L += _sweeps_section(cfg.name, sweep_figs)
    if not pipe.released:
        L += _counterfactual(pipe, metrics, figdir)
        L += _abc(pipe, figdir)
    L += _known_answers(pipe) + _studies(pipe) + _curation(pipe) + _fidelity(pipe)
    L += _appendix(pipe, metrics, feature)
    path = root / "report.md"
    atomic_write_bytes(path, "\n".join(L).encode())
    if not pipe.released and pipe.cfg.world.kind != "encoded":  # (no images to show)
        write_report_html(pipe, metrics, k0)
    return path


def _sweeps_section(name: str, sweep_figs: dict) -> list[str]:
    if not sweep_figs:
        return ["", "## Sweeps", "", f"No sweep of experiment `{name}` has results yet: "
                "`attribution sweep sweeps/<name>.yaml` (the toy sweeps run on `toy_evidence`) "
                "then rerunning this command adds their figures here.", ""]
    L = ["", "## Sweeps", ""]
    for sweep, path in sweep_figs.items():
        L += [f"### {sweep}", "", f"![{sweep}](figures/{path.name})", ""]
    return L


def _appendix(pipe, metrics: dict, feature: str) -> list[str]:
    """The stages, every figure of metrics.json (other methods' in the file) and the config."""
    L = ["## Appendix: stages and every figure of metrics.json", "", *_stage_rows(pipe), "",
         "| metric | value |", "|---|---:|"]
    L += [f"| {k} | {_f(v, 4)} |" for k, v in metrics.items()
          if not k.startswith("baseline.") or k.startswith(f"baseline.{feature}.mAP")]
    return L + ["", "Every method's figures (`baseline.<method>.*`) are in `metrics.json`.", "",
                "## Config", "", "```yaml",
                OmegaConf.to_yaml(OmegaConf.create(to_dict(pipe.cfg))).rstrip(), "```", ""]


def _reference_table(metrics: dict, feature: str, ks: list[int], kind: str = "toy"
                     ) -> list[str]:
    k = ks[-1]
    world = "the toy world" if kind == "toy" else \
        f"a {kind} world of {metrics.get('n_items', '?')} items"
    L = [f"## Beside the paper (docs/method.md §5; MSCOCO on GPUs there, {world} here)",
         "", "| what | paper | ours |", "|---|---|---|"]
    paper_space = TOY_COUNTERPART.get(feature, feature)
    if paper_space in PAPER_FEATURE_TUNING:
        b, a = PAPER_FEATURE_TUNING[paper_space]
        ours_b = metrics.get(f"baseline.{feature}.mAP@{k}", float("nan"))
        ours_a = metrics.get(f"student.mAP@{k}", float("nan"))
        L.append(f"| tuning `{feature}` (paper: {paper_space}), mAP before -> after "
                 f"(paper @1000 of 118k; ours @{k}) | {b:.3f} -> {a:.3f} (x{a / b:.2f}) | "
                 f"{ours_b:.3f} -> {ours_a:.3f} (x{ours_a / max(ours_b, 1e-12):.2f}) |")
    if "student.queries_per_second" in metrics:
        L.append(f"| student queries/s, end to end | {PAPER_QPS['student (ours)']:g} (GPU) | "
                 f"{metrics['student.queries_per_second']:.1f} (CPU, batch 1) |")
    if "teacher.seconds_per_query" in metrics:
        L.append(f"| teacher (AbU+) seconds/query | {1 / PAPER_QPS['AbU+']:,.0f} (118k items) | "
                 f"{metrics['teacher.seconds_per_query']:.1f} ({metrics.get('n_items', 'toy')} "
                 f"items) |")
    if "speedup_vs_teacher" in metrics:
        L.append(f"| speed-up of the student over AbU+ | ~{PAPER_SPEEDUP_VS_ABU_PLUS:,}x | "
                 f"{metrics['speedup_vs_teacher']:,.0f}x (grows ~linearly with the training-set "
                 f"size: the teacher scores every item, the search is a small part of a student "
                 f"query) |")
    return L + [""]


def _current_key(cfg, run_id: str) -> str | None:
    """The config hash a sweep run of this experiment would have now (None if its id does not
    parse into settings of this config)."""
    try:
        changes = OmegaConf.to_container(OmegaConf.from_dotlist(run_dotlist(run_id)))
        return run_hash(derive(cfg, changes))
    except (ConfigError, OmegaConfBaseException, ValueError, TypeError):
        return None


def _claims(cfg, k: int) -> list[str]:
    """The paper's qualitative claims, checked on this experiment's sweeps (when they ran)."""
    metric = f"student.mAP@{k}"
    root = Path(cfg.output_root) / "sweeps"
    claims = check_claims(root, cfg.name, metric)
    second = check_claims(root, cfg.name, f"second.{metric}") if cfg.second_teacher.enabled \
        else []
    rows = format_claims(claims, metric, second, cfg.second_teacher.name)
    stale = stale_runs(root, cfg.name, lambda run: _current_key(cfg, run)) if rows else {}
    warning = [f"**Stale:** {len(runs)} row(s) of `{sweep}` ({', '.join(runs[:3])}"
               f"{', ...' if len(runs) > 3 else ''}) ran under another configuration than this "
               f"run's (a default changed since, other overrides, or a moved runs folder); "
               f"their claims describe that configuration. "
               f"`attribution sweep sweeps/{sweep}.yaml` reruns them." for sweep, runs in
               stale.items()]
    if not rows:
        return ["## The paper's qualitative claims", "",
                f"No sweep of experiment `{cfg.name}` has finished: `attribution sweep "
                "sweeps/<name>.yaml` (for the sweeps whose command names this experiment) adds "
                "the table of claims here.", ""]
    return ["## The paper's qualitative claims", "",
            "Each claim as a difference of two test-query means, paired over the test queries "
            "both runs scored (rows marked *unpaired* had no per-query AP saved: their two "
            "standard errors are combined as if independent, which overstates the error); "
            "*holds* / *does not hold* need more than two standard errors.", "",
            *[line for w in warning for line in (w, "")], *rows, ""]


def _counterfactual(pipe, metrics: dict, figdir: Path) -> list[str]:
    """Every schedule's leave-K-out result (full length first), and whether the shorter
    schedule ranks the removals as the full one does, when both were run."""
    paths = result_files(pipe.counterfactual_dir())
    if not paths:
        return ["## Counterfactual (leave-K-out)", "",
                "Not run yet: `attribution counterfactual CONFIG --methods teacher student dtrak "
                "random --queries 0 1 2 -k 10` (one generator retraining per method and query).",
                ""]
    L = ["## Counterfactual (leave-K-out)", ""]
    for path in paths:
        result = json.loads(path.read_text())
        fig = figures.counterfactual_figure(result, metrics, figdir / path.with_suffix(".png").name)
        L += ["```", format_counterfactual(result), "```", "",
              f"![counterfactual](figures/{fig.name})", ""]
    pairs = schedule_pairs(pipe.counterfactual_dir())
    if pairs:
        L += ["```", format_schedule_pairs(pairs), "```", ""]
    return L


def _abc(pipe, figdir: Path) -> list[str]:
    path = pipe.dir("abc") / "abc.json"
    if not path.is_file():
        return ["## Customization benchmark (known answers)", "",
                "Not run for this config: `attribution abc CONFIG` (or `abc.enabled=true`).", ""]
    summary = json.loads(path.read_text())
    fig = figures.abc_figure(summary, figdir / "abc.png")
    return ["## Customization benchmark (known answers)", "", format_abc(summary), "",
            f"![abc](figures/{fig.name})", "",
            "![held-out concepts: exemplars, then synthesized images](" + os.path.relpath(
                pipe.dir("customize") / "grid_test.png", pipe.root) + ")", ""]


def _json_section(path: Path, title: str, fmt, intro: str = "") -> list[str]:
    """A titled section printing a stage's JSON result with the CLI's own formatter."""
    if not path.is_file():
        return []
    body = fmt(json.loads(path.read_text()))
    return [f"## {title}", "", *([intro, ""] if intro else []), "```", body, "```", ""]


def _known_answers(pipe) -> list[str]:
    if not pipe.cfg.world.planted:  # nothing planted: no known answers to show
        return []
    return _json_section(pipe.dir("teacher") / "known_answers.json",
                         "Teacher known answers (planted concepts)", format_known_answers)


def _studies(pipe) -> list[str]:
    """The teacher studies run on this teacher (``attribution study teacher-steps``): each
    leaves ``*.report.md`` fragments in the study folder, included here as text with their
    image links made relative to the report (the report never imports the studies)."""
    folder = pipe.step_study_dir()
    if pipe.released or not folder.is_dir():
        return []
    L = []  # the one-step study's fragments first, then each unlearning path's
    for frag in sorted(folder.rglob("*.report.md"), key=lambda f: (len(f.parts), f)):
        rel = frag.parent.relative_to(pipe.root).as_posix()
        L += [re.sub(r"!\[([^\]]*)\]\(([^)/:]+)\)", rf"![\1]({rel}/\2)", frag.read_text()), ""]
    return ["## Teacher step size", "", *L] if L else []


def _curation(pipe) -> list[str]:
    """Curation recall of every stage-1 space and K (from the ceiling stage's full-set scores of
    training queries); the run's own choice in bold."""
    path = pipe.dir("ceiling") / "curation.json"
    if pipe.released or not pipe.cfg.ceiling.enabled or not path.is_file():
        return []
    chosen = (pipe.cfg.teacher.curation, pipe.cfg.teacher.k)
    L = ["## Curation recall", "",
         "Share of the teacher's full-set top 10 inside the stage-1 K-set, for training queries "
         "scored over every item (`ceiling.curation_queries`); in bold this run's "
         "`teacher.curation` and `teacher.k`.", "",
         "| stage-1 space | K | recall@10 (s.e.) |", "|---|---:|---:|"]
    for r in json.loads(path.read_text()):
        cells = [r["space"], str(r["K"]), f"{r['recall@10']:.2f} ({r['recall@10_stderr']:.2f})"]
        if (r["space"], r["K"]) == chosen:
            cells = [f"**{c}**" for c in cells]
        L.append("| " + " | ".join(cells) + " |")
    return L + [""]


def _fidelity(pipe) -> list[str]:
    path = pipe.dir("fidelity") / "fidelity.json"
    L = _json_section(path, "Generator prompt fidelity", format_fidelity,
                      "Samples for uniform random prompts, read by an attribute classifier "
                      "trained on the real toy images (its accuracy on held-out real images, "
                      "'clf on real', bounds what can be read).")
    if L:
        L += ["![fidelity samples](" + os.path.relpath(
            pipe.dir("fidelity") / "fidelity_samples.png", pipe.root) + ")", ""]
    return L
