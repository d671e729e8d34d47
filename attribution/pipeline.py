"""Stages of the main job and their cache.

Each stage writes into ``runs/<name>/<stage>-<key>/`` where ``key`` hashes the config sections the
stage reads plus the keys of the stages it depends on.  A finished stage leaves ``stage.json``;
rerunning with the same settings reuses it, a changed setting gets a new folder (old results stay),
and an interrupted stage resumes inside its folder (the generator from ``last.ckpt``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution.abc.benchmark import stage_sections as abc_sections
from attribution.common.files import (
    DataFileError,
    atomic_write_bytes,
    read_json,
    record_files,
    verify_files,
)
from attribution.config import config_hash, save_config, to_dict
from attribution.data.dataset import read_manifest

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


def _unset_dropped(section, keys: set[str]) -> dict:
    return {k: v for k, v in to_dict(section).items() if not (k in keys and v is None)}


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
            "customize": [abc_sections(c)[0], c.queries.sampling, c.seed],
            "abc_teacher": [{k: v for k, v in to_dict(c.teacher).items()
                             if k not in EXECUTION_ONLY}, c.abc.teacher_images, c.seed],
            "abc": [abc_sections(c)[1], c.seed],
        }[stage]

    @property
    def released(self) -> bool:
        """Released-data mode: the student reads the released features and rankings."""
        return self.cfg.data.source == "released"

    def depends(self, stage: str) -> list[str]:
        return [] if self.released and stage == "student" else DEPENDS[stage]

    def key(self, stage: str) -> str:
        upstream = [self.key(d) for d in self.depends(stage)]
        return config_hash(stage, *self._sections(stage), *upstream)

    def dir(self, stage: str) -> Path:
        return self.root / f"{stage}-{self.key(stage)}"

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
            from attribution.config import ConfigError

            raise ConfigError(
                f"world.kind=encoded has latents and token states but no images, so it cannot "
                f"run {sorted(set(wanted) & NEEDS_IMAGES)}; it runs world, text, generator, "
                "queries, fisher and teacher. Train the student on the released features "
                "(data.source=released) or use world.kind=folder over the images")
        if self.released:
            if stages and set(stages) - {"student"}:
                from attribution.config import ConfigError

                raise ConfigError(f"data.source=released runs only the student stage (features "
                                  f"and rankings come from the data root), not {stages}")
            wanted = ["student"]
        needed: list[str] = []

        def add(s):
            for d in self.depends(s):
                add(d)
            if s not in needed:
                needed.append(s)

        for s in wanted:
            add(s)
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
        student = json.loads((self.dir("student") / "metrics.json").read_text())
        if self.released:  # no generator, teacher or extractor here: the student's own figures
            out = {k: v for k, v in student.items() if k.startswith(("student.", "baseline."))}
            # features come precomputed: a query's cost here is the head + the search
            out["student.queries_per_second"] = student.get(
                "student.head_search_queries_per_second", float("nan"))
            atomic_write_bytes(self.root / "metrics.json", json.dumps(out, indent=2).encode())
            return out
        teacher = json.loads((self.dir("teacher") / "stage.json").read_text())["summary"]
        out = {k: v for k, v in student.items()
               if k.startswith(("student.mAP", "student.val_mAP", "baseline."))}
        # Test queries are scored against the whole training set: that is a query's real cost.
        out["teacher.seconds_per_query"] = teacher["seconds_per_test_query"]
        out["teacher.seconds_per_train_query"] = teacher["seconds_per_train_query"]
        for name, r in teacher.get("known_answers", {}).items():
            out[f"teacher.{name}_recall@10"] = r["recall@10"]
        from attribution.attribute import student_test_ranks
        from attribution.baselines.run import known_answer_recall, map_by_type, query_types

        student_rank = student_test_ranks(self)
        for name, v in known_answer_recall(self, student_rank).items():
            out[f"student.{name.replace(' ', '_')}"] = v
        # every method's mAP on ordinary and on planted-concept test queries apart
        types = query_types(self)
        with np.load(self.dir("teacher") / "teacher_test.npz") as merged:
            teacher_rank = merged["rank"]
        ks = [k for k in self.cfg.student.k_eval if k <= teacher_rank.shape[1]]
        ceiling = self.finished("ceiling") if self.cfg.ceiling.enabled else None
        if ceiling is not None:  # the teacher against itself: every method's ceiling
            from attribution.teacher.ceiling import self_agreement

            out.update({f"teacher.{k}": v for k, v in ceiling["summary"].items()})
            out.update({f"teacher.{k}": v for k, v in self_agreement(
                self.dir("ceiling"), teacher_rank, ks,
                ceiling["summary"].get("self_queries", 0)).items()})
        ranked = {"student": student_rank}
        if (self.dir("baselines") / "stage.json").is_file():
            ranked.update({f"baseline.{p.stem[5:]}": np.load(p)
                           for p in sorted(self.dir("baselines").glob("rank_*.npy"))})
        for method, rank in ranked.items():
            out.update({f"{method}.{k}": v
                        for k, v in map_by_type(rank, teacher_rank, ks, types).items()})
        e2e = student.get("end_to_end", {})
        out["student.queries_per_second"] = e2e.get("queries_per_second", float("nan"))
        out["search.queries_per_second"] = e2e.get("search_queries_per_second", float("nan"))
        out["speedup_vs_teacher"] = out["teacher.seconds_per_query"] * out[
            "student.queries_per_second"]
        feature = self.cfg.student.feature
        out[f"baseline.{feature}.queries_per_second"] = e2e.get("baseline_queries_per_second",
                                                               float("nan"))
        out["student.storage_bytes"] = e2e.get("storage_bytes", 0)
        out[f"baseline.{feature}.storage_bytes"] = e2e.get("baseline_storage_bytes", 0)
        out["teacher.storage_bytes"] = self.teacher_storage_bytes()
        out["n_items"] = e2e.get("n_items", 0)
        base = self.dir("baselines") / "baselines.json"
        if (self.dir("baselines") / "stage.json").is_file():
            for method, r in json.loads(base.read_text()).items():
                for k, v in r.items():
                    out.setdefault(f"baseline.{method}.{k.replace(' ', '_')}", v)
        atomic_write_bytes(self.root / "metrics.json", json.dumps(out, indent=2).encode())
        return out

    def teacher_storage_bytes(self) -> int:
        """What the teacher keeps to answer a query: generator weights, Fisher, training data."""
        files = [f for d in (self.dir("generator") / "unet", self.dir("fisher"))
                 for f in d.rglob("*.safetensors")]
        world = self.dir("world")
        data = sum(f.stat().st_size for f in world.rglob("*.np[yz]")) or sum(
            f.stat().st_size for f in world.rglob("*.png"))
        return sum(f.stat().st_size for f in files) + data

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
        out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, out / "config.yaml")
        start = time.time()
        summary = getattr(self, f"_stage_{stage}")(out)
        seconds = time.time() - start
        info = {"stage": stage, "key": self.key(stage), "seconds": seconds, "summary": summary,
                "files": record_files(out)}
        atomic_write_bytes(out / "stage.json", json.dumps(info, indent=2).encode())
        self._verified.add(stage)
        return StageResult(stage, out, summary, False, seconds)

    # ------------------------------------------------------------------------------ stages
    def _stage_world(self, out: Path) -> dict:
        from attribution.data import toy_world
        from attribution.data.dataset import write_world

        w = self.cfg.world
        if w.kind == "encoded":  # validated and pointed at, not copied
            from attribution.data.encoded import EncodedWorld

            enc = EncodedWorld(w.root)
            manifest = {"kind": "encoded", "encoded_root": str(enc.root.resolve()),
                        "n_items": len(enc), "image_size": enc.manifest["image_size"],
                        "captions_per_item": int(enc.states.shape[1]),
                        "text_encoder": enc.manifest.get("text_encoder", ""),
                        "scale": enc.manifest["scale"], "token_length": int(enc.states.shape[2]),
                        "sha256": {"encoding": enc.fingerprint()}, "seed": self.cfg.seed}
            atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
            return {"items": len(enc), "captions": len(enc) * manifest["captions_per_item"],
                    "latents": list(enc.latents.shape[1:])}
        if w.kind == "folder":
            from attribution.data.folder import read_image_caption_data

            images, caps = read_image_caption_data(w.root, w.image_size, w.captions_per_item,
                                                   w.n_items)
            write_world(out, images, caps, [{} for _ in caps],
                        {"config": to_dict(w), "seed": self.cfg.seed,
                         "source": str(Path(w.root).expanduser().resolve())})
            return {"items": len(caps), "captions": sum(len(c) for c in caps)}
        images, caps, attrs = toy_world.generate_world(
            w.n_items, w.image_size, w.captions_per_item, w.zipf,
            [to_dict(p) for p in w.planted], self.cfg.seed)
        write_world(out, images, caps, attrs, {"config": to_dict(w), "seed": self.cfg.seed})
        return {"items": len(caps), "captions": sum(len(c) for c in caps)}

    def _stage_text(self, out: Path) -> dict:
        from attribution.data.dataset import CaptionedImageSet
        from attribution.data.text_cache import TextTable
        from attribution.generator.text_encoder import load_text_encoder

        t = self.cfg.text_encoder
        enc = load_text_encoder(t.name, t.weights, t.max_length)
        world_manifest = read_manifest(self.dir("world"))
        if world_manifest.get("kind") == "encoded":  # token states exist: point at them
            from attribution.config import ConfigError

            if enc.source != world_manifest["text_encoder"]:
                raise ConfigError(
                    f"text_encoder ({enc.source}) is not the encoder the pre-encoded world was "
                    f"made with ({world_manifest['text_encoder']}): queries would be encoded "
                    "differently from the training captions")
            if t.max_length != world_manifest["token_length"]:
                raise ConfigError(f"text_encoder.max_length={t.max_length} but the pre-encoded "
                                  f"captions have {world_manifest['token_length']} tokens")
            root = world_manifest["encoded_root"]
            atomic_write_bytes(out / "manifest.json", json.dumps(
                {"encoded_root": root, "source": enc.source}, indent=2).encode())
            table = TextTable.load(out)
            return {"distinct_texts": int(table.embeddings.shape[0]),
                    "dim": int(table.embeddings.shape[-1]), "memory_mapped": True}
        world = CaptionedImageSet(self.dir("world"))
        table = TextTable.build(enc, world.captions, t.batch_size)
        table.save(out)
        return {"distinct_texts": len(table.texts), "dim": int(table.embeddings.shape[-1])}

    def _stage_generator(self, out: Path) -> dict:
        from attribution.generator.train import train_generator

        g = self.cfg.generator
        if g.weights or g.pretrained:  # released / pretrained weights: load, check, save
            from attribution.generator.model import (
                build_codec,
                load_pretrained_unet,
                load_unet_weights,
                save_generator,
            )

            world_manifest = read_manifest(self.dir("world"))
            size = world_manifest["image_size"]
            codec = build_codec(g, size)
            source = g.weights or g.pretrained
            unet = (load_unet_weights(g, codec, g.weights) if g.weights
                    else load_pretrained_unet(g, codec, g.pretrained))
            save_generator(out, unet, {"config": to_dict(g), "world": world_manifest["sha256"],
                                       "source": str(Path(source).resolve()), "steps": 0,
                                       "image_size": size, "excluded": []})
            return {"loaded": str(source), "params": sum(p.numel() for p in unet.parameters())}

        return train_generator(self.cfg, self.dir("world"), self.dir("text"), out, self.progress)

    def _stage_queries(self, out: Path) -> dict:
        from attribution.generator.queries import generate_queries

        return generate_queries(self.cfg, self.dir("generator"), out, self.progress,
                                self.dir("world"))

    def _stage_fidelity(self, out: Path) -> dict:
        from attribution.fidelity import prompt_fidelity

        if self.cfg.world.kind != "toy":
            from attribution.config import ConfigError

            raise ConfigError("prompt fidelity reads the toy world's ground-truth attributes; "
                              f"world.kind={self.cfg.world.kind} has none")

        res = prompt_fidelity(self.cfg, self.dir("world"), self.dir("generator"), out,
                              self.progress)
        return {f"{a}_acc": r["accuracy"] for a, r in res["attributes"].items()}

    def _stage_fisher(self, out: Path) -> dict:
        from attribution.teacher.run import fit_fisher

        return fit_fisher(self.cfg, self.dir("world"), self.dir("text"), self.dir("generator"),
                          out, self.progress)

    def _stage_teacher(self, out: Path) -> dict:
        from attribution.data.dataset import CaptionedImageSet
        from attribution.data.queries import QuerySet
        from attribution.teacher.evaluate import planted_known_answers
        from attribution.teacher.run import run_teacher

        summary = run_teacher(self.cfg, self.dir("world"), self.dir("text"),
                              self.dir("generator"), self.dir("queries"), self.dir("fisher"),
                              out, self.progress)
        if self.cfg.world.kind == "encoded":  # no attributes, so no planted known answers
            return summary
        test = QuerySet(self.dir("queries") / "query_test")
        with np.load(out / "teacher_test.npz") as merged:  # written by run_teacher's merge
            rank = merged["rank"]
        known = planted_known_answers(CaptionedImageSet(self.dir("world")).attributes,
                                      test.attributes, rank,
                                      [to_dict(p) for p in self.cfg.world.planted])
        atomic_write_bytes(out / "known_answers.json", json.dumps(known, indent=2).encode())
        summary["known_answers"] = known
        for name, r in known.items():
            summary[f"{name} recall@10"] = r["recall@10"]
            summary[f"{name} mrr"] = r["mrr"]
        return summary

    def feature_context(self, image_size: int) -> dict:
        """What feature extractors are built from (see features.extractors.build_extractor)."""
        f = self.cfg.features
        return {"image_size": image_size, "toyclip_dir": self.dir("toyclip"),
                "weights": to_dict(f.weights), "arch": to_dict(f.arch)}

    def _stage_toyclip(self, out: Path) -> dict:
        from attribution.data.dataset import CaptionedImageSet
        from attribution.features.toyclip import train_toyclip

        f = self.cfg.features
        return train_toyclip(CaptionedImageSet(self.dir("world")), out, f.toyclip_steps,
                             f.toyclip_batch_size, f.toyclip_lr, f.toyclip_width,
                             f.toyclip_embed_dim, self.cfg.seed, self.progress)

    def _stage_features(self, out: Path) -> dict:
        from attribution.data.dataset import CaptionedImageSet
        from attribution.data.queries import QuerySet
        from attribution.features.cache import extract_all
        from attribution.features.extractors import build_extractor
        from attribution.student.train import space_dir

        f = self.cfg.features
        world = CaptionedImageSet(self.dir("world"))
        queries = {s: QuerySet(self.dir("queries") / f"query_{s}") for s in ("train", "test")}
        ctx = self.feature_context(world.manifest["image_size"])
        dims = {}
        for space in f.spaces:
            extractor = build_extractor(space, ctx, f.l2_per_block)
            dims[space] = extract_all(extractor, world, queries, space_dir(out, space),
                                      f.batch_size)["dim"]
        return {"spaces": len(dims), "dims": dims}

    def _stage_ceiling(self, out: Path) -> dict:
        from attribution.teacher.ceiling import run_ceiling

        return run_ceiling(self.cfg, self.dir("world"), self.dir("text"), self.dir("generator"),
                           self.dir("queries"), self.dir("fisher"), self.dir("teacher"), out,
                           self.progress)

    def _stage_baselines(self, out: Path) -> dict:
        from attribution.baselines.run import run_baselines

        return run_baselines(self, out, self.progress)

    def _stage_customize(self, out: Path) -> dict:
        from attribution.abc.benchmark import run_customize

        return run_customize(self, out, self.progress)

    def _stage_abc_teacher(self, out: Path) -> dict:
        from attribution.abc.benchmark import run_abc_teacher

        return run_abc_teacher(self, out, self.progress)

    def _stage_abc(self, out: Path) -> dict:
        from attribution.abc.benchmark import run_abc

        return run_abc(self, out, self.progress)

    def _stage_student(self, out: Path) -> dict:
        from attribution.attribute import end_to_end_throughput
        from attribution.student.train import train_student

        if self.released:
            from attribution.data.released import check_released

            root = self.released_root()
            check_released(root, [self.cfg.student.feature])
            metrics = train_student(self.cfg, root / "feats", root, out, self.progress,
                                    released=True)
            atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
            return metrics

        metrics = train_student(self.cfg, self.dir("features"), self.dir("teacher"), out,
                                self.progress)
        metrics["end_to_end"] = end_to_end_throughput(self)
        atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        return metrics
