"""The main job's scheduler: stages in dependency order, each cached by its settings, resumable.

Each stage writes into ``runs/<name>/<stage>-<key>/`` where ``key`` hashes the config sections the
stage reads plus the keys of the stages it depends on.  A finished stage leaves ``stage.json``
(its summary and the size + sha256 of every file it wrote); rerunning with the same settings
reuses it after checking those files, a changed setting gets a new folder (old results stay),
and an interrupted stage resumes inside its folder (the generator from ``last.ckpt``).

A stage is a plain function ``run(cfg, inputs, out, progress) -> summary`` in its own package
(``STAGES``): ``inputs`` maps every stage it depends on, directly or not, to that stage's
finished folder.  This module only orders, caches and resumes; it runs no stage body itself.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attribution.common.files import (
    DataFileError,
    atomic_write_bytes,
    read_json,
    record_files,
    verify_files,
)
from attribution.config import ConfigError, config_hash, derive, save_config, to_dict

DEPENDS = {
    "world": [],
    "text": ["world"],
    "generator": ["text"],
    "queries": ["generator"],
    "fidelity": ["generator"],
    "fisher": ["generator"],
    "teacher": ["fisher", "queries"],
    "ceiling": ["teacher"],
    "toyclip": ["world"],
    "features": ["toyclip", "queries"],
    "student": ["features", "teacher"],
    "baselines": ["features", "teacher"],
    "customize": ["generator"],
    "abc_teacher": ["customize", "fisher"],
    "abc": ["abc_teacher", "features", "student"],
}
OPTIONAL = {"customize", "abc_teacher", "abc"}  # run by default only with abc.enabled
# Teacher settings that change only speed or placement, never results: not part of cache keys.
EXECUTION_ONLY = {"devices", "num_nodes", "strategy", "batch_size", "query_batch_size",
                  "fisher_batch_size"}
# Student settings that change only placement, logging or the deployed search, never training.
STUDENT_EXECUTION_ONLY = {"num_workers", "logger", "devices", "num_nodes", "strategy", "rerank"}
# Keys added to a section after caches existed: left out of its key while unset (None), so
# adding them kept every existing cache valid.
ADDED_LATER = {"world": {"root"}, "generator": {"weights", "pretrained"}}
ORDER = list(DEPENDS)
# The command that (re)builds each stage: named in every error about a stage's files.
COMMAND = {"world": "world", "text": "text", "generator": "train-generator",
           "queries": "queries", "fidelity": "fidelity", "fisher": "teacher fisher",
           "teacher": "teacher score", "ceiling": "run", "toyclip": "toyclip",
           "features": "features", "student": "student", "baselines": "run",
           "customize": "customize", "abc_teacher": "abc", "abc": "abc"}
# A pre-encoded world (world.kind=encoded) holds latents and token states, not images: the
# stages that look at images cannot run on it (at MSCOCO scale the student reads the released
# features: data.source=released).
NEEDS_IMAGES = {"fidelity", "toyclip", "features", "student", "baselines", "customize",
                "abc_teacher", "abc"}


# Where each stage's body lives: "module:function", imported when the stage runs (so commands that
# run no stage, like `attribution config`, stay fast).
STAGES = {
    "world": "attribution.data.stage:run_world",
    "text": "attribution.generator.stages:run_text",
    "generator": "attribution.generator.stages:run_generator",
    "queries": "attribution.generator.stages:run_queries",
    "fidelity": "attribution.fidelity:run_fidelity",
    "fisher": "attribution.teacher.stages:run_fisher",
    "teacher": "attribution.teacher.stages:run_teacher",
    "ceiling": "attribution.teacher.stages:run_ceiling",
    "toyclip": "attribution.features.stage:run_toyclip",
    "features": "attribution.features.stage:run_features",
    "student": "attribution.student.stage:run_student",
    "baselines": "attribution.baselines.run:run_baselines",
    "customize": "attribution.abc.customize_stage:run_customize",
    "abc_teacher": "attribution.abc.stages:run_abc_teacher",
    "abc": "attribution.abc.stages:run_abc",
}
# What of the `abc` section the customize stage reads (the rest, but teacher_images, is abc's).
CUSTOMIZE_KEYS = ("n_train", "n_test", "exemplars", "images", "steps", "lr", "batch_size",
                  "prior_weight", "prior_batch_size", "params")


def _unset_dropped(section, keys: set[str]) -> dict:
    return {k: v for k, v in to_dict(section).items() if not (k in keys and v is None)}


def _abc_sections(cfg) -> tuple[dict, dict]:
    """(what the customize stage reads, what the abc stage reads) of the ``abc`` section."""
    d = to_dict(cfg.abc)
    d["spaces"] = d["spaces"] or list(cfg.features.spaces)
    d.pop("enabled")
    custom = {k: d.pop(k) for k in CUSTOMIZE_KEYS}
    d.pop("teacher_images")  # the abc_teacher stage's
    return custom, d


def stage_function(stage: str) -> Callable:
    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class StageResult:
    name: str
    dir: Path
    summary: dict
    cached: bool
    seconds: float

    def line(self) -> str:
        how = "cached" if self.cached else f"{self.seconds:7.1f} s"
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in self.summary.items()
                            if not isinstance(v, dict))
        return f"[{self.name:>9}] {how:>10}  {figures}  -> {self.dir}"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Pipeline:
    """Runs stages in dependency order with caching; see the module docstring."""

    order = ORDER

    def __init__(self, cfg, progress: bool = True, echo: Callable[[str], None] = print,
                 config_path: str | None = None):
        self.cfg, self.progress, self.echo = cfg, progress, echo
        self.root = Path(cfg.output_root) / cfg.name
        self.config_path = config_path or "CONFIG"  # how errors spell the rebuild command
        self._verified: set[str] = set()

    def _sections(self, stage: str) -> list:
        c = self.cfg
        return {
            "world": [_unset_dropped(c.world, ADDED_LATER["world"]), c.seed],
            "text": [c.text_encoder],
            "generator": [_unset_dropped(c.generator, ADDED_LATER["generator"]), c.seed],
            "queries": [c.queries, c.seed],
            "fidelity": [c.fidelity, c.queries.sampling, c.seed],
            "fisher": [{k: to_dict(c.teacher)[k] for k in ("fisher", "params", "fisher_epochs")},
                       c.seed],
            "teacher": [{k: v for k, v in to_dict(c.teacher).items()
                         if k not in EXECUTION_ONLY}, c.seed],
            "ceiling": [c.ceiling, c.seed],
            "toyclip": [{k: v for k, v in to_dict(c.features).items() if k.startswith("toyclip")},
                        c.seed],
            "features": [{k: v for k, v in to_dict(c.features).items()
                          if not k.startswith("toyclip") and k != "batch_size"}],
            "student": [{**{k: v for k, v in to_dict(c.student).items()
                            if k not in STUDENT_EXECUTION_ONLY},
                         "seed": c.seed if c.student.seed is None else c.student.seed}, c.seed,
                        *([str(self.released_root())] if self.released else [])],
            "baselines": [c.baselines, c.student.k_eval, c.seed],
            "customize": [_abc_sections(c)[0], c.queries.sampling, c.seed],
            "abc_teacher": [{k: v for k, v in to_dict(c.teacher).items()
                             if k not in EXECUTION_ONLY}, c.abc.teacher_images, c.seed],
            "abc": [_abc_sections(c)[1], c.seed],
        }[stage]

    @property
    def released(self) -> bool:
        """Released-data mode: the student reads the released features and rankings."""
        return self.cfg.data.source == "released"

    def depends(self, stage: str) -> list[str]:
        return [] if self.released and stage == "student" else DEPENDS[stage]

    def ancestors(self, stage: str) -> list[str]:
        """Every stage ``stage`` depends on, directly or not, in run order."""
        seen: list[str] = []

        def add(s):
            for d in self.depends(s):
                add(d)
                if d not in seen:
                    seen.append(d)

        add(stage)
        return seen

    def key(self, stage: str) -> str:
        upstream = [self.key(d) for d in self.depends(stage)]
        return config_hash(stage, *self._sections(stage), *upstream)

    def dir(self, stage: str) -> Path:
        return self.root / f"{stage}-{self.key(stage)}"

    def dirs(self) -> dict[str, Path]:
        """Every stage's folder for this config (finished or not)."""
        return {s: self.dir(s) for s in ORDER}

    def inputs(self, stage: str) -> dict[str, Path]:
        """What a stage function receives: the folders of every stage it depends on."""
        inputs = {s: self.dir(s) for s in self.ancestors(stage)}
        if stage == "student" and self.released:
            inputs["released"] = self.released_root()
        return inputs

    def run(self, stages: list[str] | None = None) -> dict[str, StageResult]:
        """Run ``stages`` (default: all) and what they depend on; return every stage's result."""
        kind = self.cfg.world.kind
        skip = {"toy": set(), "folder": {"fidelity"}, "encoded": NEEDS_IMAGES}[kind]
        if not self.cfg.ceiling.enabled:
            skip = skip | {"ceiling"}
        wanted = stages or [s for s in ORDER if (s not in OPTIONAL or self.cfg.abc.enabled)
                            and s not in skip]
        unknown = [s for s in wanted if s not in DEPENDS]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {ORDER}")
        if kind == "encoded" and not self.released and set(wanted) & NEEDS_IMAGES:
            raise ConfigError(
                f"world.kind=encoded has latents and token states but no images, so it cannot "
                f"run {sorted(set(wanted) & NEEDS_IMAGES)}; it runs world, text, generator, "
                "queries, fisher and teacher. Train the student on the released features "
                "(data.source=released) or use world.kind=folder over the images")
        if self.released:
            if stages and set(stages) - {"student"}:
                raise ConfigError(f"data.source=released runs only the student stage (features "
                                  f"and rankings come from the data root), not {stages}")
            wanted = ["student"]
        needed: list[str] = []
        for s in wanted:
            needed += [a for a in [*self.ancestors(s), s] if a not in needed]
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.root / "config.yaml")
        results = {}
        for s in needed:
            results[s] = self.run_stage(s)
            self.echo(results[s].line())
        if "student" in results:
            from attribution.report import write_report

            self.write_metrics()
            self.echo(f"[   report] {write_report(self)}")
        return results

    def released_root(self) -> Path:
        from attribution.data.released import data_root

        return data_root(self.cfg).resolve()

    def write_metrics(self) -> dict:
        """``runs/<name>/metrics.json``: the headline figures of the run, flat keys."""
        from attribution.evaluation import write_metrics

        finished = {s: info["summary"] for s in ("student", "teacher", "ceiling", "baselines")
                    if not (self.released and s != "student")
                    and (s != "ceiling" or self.cfg.ceiling.enabled)
                    and (info := self.finished(s)) is not None}
        return write_metrics(self.cfg, self.dirs(), finished, self.root / "metrics.json")

    def rebuild_hint(self, stage: str) -> str:
        return (f"delete the folder {self.dir(stage)} and rerun `attribution {COMMAND[stage]} "
                f"{self.config_path}` (other stages' results are kept)")

    def finished(self, stage: str) -> dict | None:
        """A finished stage's ``stage.json`` with every recorded file verified (once per
        pipeline); None when the stage has not finished."""
        marker = self.dir(stage) / "stage.json"
        if not marker.is_file():
            return None
        info = read_json(marker, f"The {stage} stage's completion record",
                         self.rebuild_hint(stage))
        if not isinstance(info, dict) or not isinstance(info.get("summary"), dict):
            raise DataFileError(f"The {stage} stage's completion record is not one this "
                                f"project writes: {marker}. To rebuild it, "
                                f"{self.rebuild_hint(stage)}.")
        if stage not in self._verified:
            # records made before files were recorded ("files" absent) cannot be checked
            verify_files(self.dir(stage), info.get("files", {}), self.rebuild_hint(stage))
            self._verified.add(stage)
        return info

    def verified_dir(self, stage: str) -> Path:
        """The folder of a finished, verified stage (for readers outside :meth:`run`)."""
        if self.finished(stage) is None:
            raise DataFileError(f"The {stage} stage has not finished for this config "
                                f"({self.dir(stage)}): run `attribution {COMMAND[stage]} "
                                f"{self.config_path}` first")
        return self.dir(stage)

    def run_stage(self, stage: str) -> StageResult:
        out = self.dir(stage)
        info = self.finished(stage)
        if info is not None:
            return StageResult(stage, out, info["summary"], True, info.get("seconds", 0.0))
        for s in self.ancestors(stage):  # what the stage reads is verified before it runs
            self.verified_dir(s)
        inputs = self.inputs(stage)
        if stage == "baselines" and self.cfg.baselines.abu_diagonal:
            inputs.update(self._diagonal_teacher())
        out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, out / "config.yaml")
        start = time.time()
        summary = stage_function(stage)(self.cfg, inputs, out, self.progress)
        seconds = time.time() - start
        info = {"stage": stage, "key": self.key(stage), "seconds": seconds, "summary": summary,
                "files": record_files(out)}
        atomic_write_bytes(out / "stage.json", json.dumps(info, indent=2).encode())
        self._verified.add(stage)
        return StageResult(stage, out, summary, False, seconds)

    def _diagonal_teacher(self) -> dict[str, Path]:
        """The AbU (diagonal Fisher) baseline is the teacher stage of the same config with
        ``teacher.fisher=diagonal``: scheduled and cached like any stage, by a second pipeline."""
        sub = Pipeline(derive(self.cfg, {"teacher": {"fisher": "diagonal"}}), self.progress,
                       self.echo, self.config_path)
        sub.run(["teacher"])
        return {"abu_diagonal": sub.verified_dir("teacher"),
                "abu_diagonal_fisher": sub.verified_dir("fisher")}

    # ---------------------------------------------------------------- commands beyond `run`
    def deployment_dirs(self) -> dict[str, Path]:
        """The verified folders a deployed student answers from (``attribute``)."""
        self.verified_dir("student")  # a deployed student is a finished one
        return {s: self.verified_dir(s) for s in ("world", "toyclip", "features", "student")}

    def calibrator(self, method: str = "student"):
        """The customization benchmark's soft-attribution calibrator, or None (not run)."""
        if self.finished("abc") is None:
            return None
        from attribution.abc.calibration import load_calibrator

        return load_calibrator(self.dir("abc"), method)

    def counterfactual_dir(self) -> Path:
        """Where this run's counterfactuals live (tied to its student and baselines)."""
        return self.root / f"counterfactual-{config_hash('cf', self.key('baselines'), self.key('student'))}"

    def run_counterfactual(self, methods: list[str], queries: list[int], k: int,
                           progress: bool = True, echo=print, steps: int | None = None) -> Path:
        """Leave-K-out (``counterfactual.py``) on this run's finished student and baselines."""
        from attribution.counterfactual import run_counterfactual

        self.run(["student", "baselines"])
        return run_counterfactual(self.cfg, self.dirs(), self.counterfactual_dir(), methods,
                                  queries, k, progress, echo, steps)
