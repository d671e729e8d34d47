"""The main job's scheduler: stages in dependency order, each cached by its settings, resumable.

Each stage writes into ``runs/<name>/<stage>-<key>/`` where ``key`` hashes the config sections the
stage reads plus the keys of the stages it depends on.  A finished stage leaves ``stage.json``
(its summary and the size + sha256 of every file it wrote); rerunning with the same settings
reuses it after checking those files, a changed setting gets a new folder (old results stay),
and an interrupted stage resumes inside its folder (the generator from ``last.ckpt``).

A stage is a plain function ``run(cfg, inputs, out, progress) -> summary`` in its own package
(``stage_table.STAGES``): ``inputs`` maps every stage it depends on, directly or not, to that stage's
finished folder.  This module only orders, caches and resumes; it runs no stage body itself.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attribution.common.devices import check_device, check_device_counts
from attribution.common.files import (
    DataFileError,
    FolderLock,
    atomic_write_bytes,
    read_json,
    record_files,
    verify_files,
)
from attribution.config import (
    FORMAT_VERSION,
    ConfigError,
    config_hash,
    derive,
    load_config,
    save_config,
)
from attribution.stage_table import (
    COMMAND,
    DEPENDS,
    ORDER,
    STAGES,
    check_images_needed,
    default_stages,
    key_sections,
)


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
                 config_path: str | None = None, rebuild: bool = False):
        self.cfg, self.progress, self.echo = cfg, progress, echo
        self.root = Path(cfg.output_root) / cfg.name
        self.config_path = config_path or "CONFIG"  # how errors spell the rebuild command
        self.rebuild = rebuild  # run in a folder made under another format (its files stay)
        self._verified: set[str] = set()
        self._keys: dict[str, str] = {}

    def _sections(self, stage: str) -> list:
        return key_sections(self.cfg, stage, self.released_root() if self.released else None)

    @property
    def released(self) -> bool:
        """Released-data mode: the student reads the released features and rankings."""
        return self.cfg.data.source == "released"

    def depends(self, stage: str) -> list[str]:
        if self.released and stage == "student":
            return []
        if stage == "text" and self.cfg.world.kind == "coco":  # reads the encoding's states
            return ["encode"]
        return DEPENDS[stage]

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
        """The stage's cache key (its folder's suffix), computed once: the config is read-only,
        and deriving a section (the second teacher's config) costs a config merge."""
        if stage not in self._keys:
            upstream = [self.key(d) for d in self.depends(stage)]
            self._keys[stage] = config_hash(stage, FORMAT_VERSION, *self._sections(stage),
                                            *upstream)
        return self._keys[stage]

    def check_format(self) -> None:
        """Refuse a run folder made by a version of this project whose stages mean something
        else (``FORMAT_VERSION``), unless ``rebuild``; then mark the folder as this format.
        A folder with finished stages but no mark predates the mark: format 1."""
        marker = self.root / "format.json"
        found = None
        if marker.is_file():
            info = read_json(marker, "The run folder's format record",
                             f"delete {marker} if the folder is this version's")
            found = info.get("format") if isinstance(info, dict) else None
        elif any(self.root.glob("*/stage.json")):
            found = 1
        if found not in (None, FORMAT_VERSION) and not self.rebuild:
            raise ConfigError(
                f"{self.root} was made by an older version of this project (format {found}; "
                f"this version writes format {FORMAT_VERSION}, with other defaults and cache "
                f"keys): delete that folder, or rerun with --rebuild to compute this version's "
                f"stages beside the old ones")
        if found != FORMAT_VERSION:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(marker, json.dumps({"format": FORMAT_VERSION}).encode())

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
        wanted = stages or default_stages(self.cfg)
        unknown = [s for s in wanted if s not in DEPENDS]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {ORDER}")
        if not self.released:
            check_images_needed(self.cfg, wanted)
        if self.released:
            if stages and set(stages) - {"student"}:
                raise ConfigError(f"data.source=released runs only the student stage (features "
                                  f"and rankings come from the data root), not {stages}")
            wanted = ["student"]
        needed: list[str] = []
        for s in wanted:
            needed += [a for a in [*self.ancestors(s), s] if a not in needed]
        check_device(self.cfg.device)  # before any work, not when a stage reaches the GPU
        check_device_counts(self.cfg.device, {
            "generator.train.devices": self.cfg.generator.train.devices,
            "teacher.devices": self.cfg.teacher.devices,
            "student.devices": self.cfg.student.devices})
        self._check_fits([s for s in needed if self.finished(s) is None])  # before any folder
        with self.lock():
            self.check_format()
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

    def lock(self) -> FolderLock:
        """One writer per run folder (``common.files.FolderLock``): a second process working
        in ``runs/<name>/`` is refused with one line naming the first."""
        return FolderLock(self.root)

    def _check_fits(self, todo: list[str]) -> None:
        """Sizes against this machine (``plan.check_fits``), then the bill (``plan.bill``)."""
        if not todo:
            return
        from attribution.plan import bill, check_fits

        try:
            line = bill(check_fits(self.cfg, self.root, todo), self.config_path)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if line:
            self.echo(f"[     plan] {line}")

    def released_root(self) -> Path:
        from attribution.data.released import data_root

        return data_root(self.cfg).resolve()

    def write_metrics(self) -> dict:
        """``runs/<name>/metrics.json``: the headline figures of the run, flat keys."""
        from attribution.evaluation import write_metrics

        finished = {s: info["summary"] for s in ("student", "teacher", "ceiling", "baselines",
                                                 "second_teacher")
                    if not (self.released and s != "student")
                    and (s != "ceiling" or self.cfg.ceiling.enabled)
                    and (s != "second_teacher" or self.cfg.second_teacher.enabled)
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

    def retrained_dir(self) -> Path:
        """Where the counterfactual's retrained generators live: keyed by the generator alone
        (what a retraining without some items depends on), shared by every teacher and student."""
        return self.root / f"retrained-{config_hash('retrained', self.key('generator'))}"

    def step_study_dir(self) -> Path:
        """Where this run's teacher step-size study lives (tied to its teacher)."""
        return self.root / f"steps-{config_hash('steps', self.key('teacher'))}"

    def run_counterfactual(self, methods: list[str], queries: list[int], k: int,
                           progress: bool = True, echo=print, steps: int | None = None,
                           split: str = "test") -> Path:
        """Leave-K-out (``counterfactual/run.py``) on the stages its methods rank from: the
        teacher always (and its step study for ``teacher@…``), the student and the baselines
        only when asked for — teacher against random does not wait for them."""
        from attribution.counterfactual.run import STEP_METHODS, run_counterfactual

        baseline = [m for m in methods if m not in ("teacher", "random", "student")
                    and not m.startswith(STEP_METHODS)]
        with self.lock():
            self.run(["teacher"] + (["student"] if "student" in methods else [])
                     + (["baselines"] if baseline else []))
            dirs = {**self.dirs(), "steps": self.step_study_dir(),
                    "retrained": self.retrained_dir()}
            return run_counterfactual(self.cfg, dirs, self.counterfactual_dir(), methods,
                                      queries, k, progress, echo, steps, split)


def script_pipeline(ap) -> tuple:
    """For benchmark and study scripts: parse CONFIG (default: the smoke config, fast from a
    fresh clone) + overrides + the script's own options of ``ap`` (an ArgumentParser)
    -> (args, cfg, a quiet Pipeline)."""
    ap.add_argument("config", nargs="?", default="configs/experiment/toy_smoke.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    return args, cfg, Pipeline(cfg, progress=False, echo=lambda s: None)
