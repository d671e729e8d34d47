"""Checking a merged config: unknown keys (with close-match hints), every field's own rule
(``rules.py``), then the rules that relate two or more fields."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from attribution.config.rules import ConfigError
from attribution.config.schema import FEATURE_EXTRACTORS, Config, PlantedConcept
from attribution.data.toy_world import all_values  # numpy only


def _check_keys(schema: Any, data: Any, path: str, source: str) -> None:
    """Fail on keys that the schema does not have, naming the key and its close matches."""
    if not isinstance(data, dict) or not isinstance(schema, DictConfig):
        return
    if schema._metadata.object_type is dict:  # a free mapping (features.weights): any key
        return
    valid = list(schema.keys())
    for key, value in data.items():
        full = f"{path}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(f'{path}{c}') for c in close)}?" if close else ""
            raise ConfigError(
                f"Unknown config key '{full}' (from {source}).{hint} "
                f"Valid keys here: {', '.join(valid)}."
            )
        child = schema[key]
        if isinstance(child, DictConfig) and not isinstance(value, dict) and not (
                value is None and key in ("weights", "arch")):
            raise ConfigError(f"Config key '{full}' (from {source}) is a section: give it a "
                              f"mapping of keys ({', '.join(list(child.keys())[:6])}, ...), "
                              f"got {value!r}")
        if isinstance(child, ListConfig) and isinstance(value, list):
            elem_schema = OmegaConf.structured(PlantedConcept) if key == "planted" else None
            for i, item in enumerate(value):
                _check_keys(elem_schema, item, f"{full}[{i}].", source)
        else:
            _check_keys(child, value, f"{full}.", source)


def check_rules(node: Any, schema: type = None, path: str = "") -> None:
    """Check every field's :class:`Rule` (recursively); the first break is a ConfigError."""
    schema = schema or Config
    for f in dataclasses.fields(schema):
        value = node[f.name] if isinstance(node, DictConfig) else getattr(node, f.name)
        key = f"{path}{f.name}"
        if dataclasses.is_dataclass(f.default_factory) and isinstance(value, DictConfig):
            check_rules(value, f.default_factory, f"{key}.")  # a nested section
            continue
        if f.name == "planted":
            for i, item in enumerate(value or []):
                check_rules(item, PlantedConcept, f"{key}[{i}].")
            continue
        rule = f.metadata.get("rule")
        if rule is None:
            continue
        if isinstance(value, ListConfig | list):
            if rule.nonempty and len(value) == 0:
                raise ConfigError(f"Config key '{key}' must not be empty")
            for i, v in enumerate(value):
                why = rule.problem(v)
                if why:
                    raise ConfigError(f"Config key '{key}' element [{i}] {why}, got {v!r}")
        else:
            why = rule.problem(value)
            if why:
                raise ConfigError(f"Config key '{key}' {why}, got {value!r}")


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def _validate(cfg: DictConfig) -> None:
    """Every field's rule (:func:`check_rules`), then the rules that relate fields."""
    check_rules(cfg)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", cfg.name) or ".." in cfg.name:
        _fail(f"Config key 'name' is the run folder's name: letters, digits, '.', '_' and '-' "
              f"only, got {cfg.name!r}")
    if not str(cfg.output_root).strip():
        _fail("Config key 'output_root' must not be empty")
    root = Path(str(cfg.output_root))
    blocker = next((a for a in [root, *root.parents] if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        _fail(f"Config key 'output_root'={cfg.output_root!r}: {blocker} is a file, not a "
              "folder (runs are written under it)")
    _validate_world(cfg)
    _validate_generator(cfg)
    _validate_teacher(cfg)
    _validate_student(cfg)
    _validate_abc(cfg)


def _validate_world(cfg: DictConfig) -> None:
    """The world's own rules (planted concepts, roots)."""
    w, g = cfg.world, cfg.generator
    if w.kind == "toy":
        for i, p in enumerate(w.planted):
            if p.value not in all_values(p.attribute):
                _fail(f"Config key 'world.planted[{i}].value' must be one of "
                      f"{all_values(p.attribute)} for attribute {p.attribute!r}, got {p.value!r}")
            if p.count >= w.n_items:
                _fail(f"Config key 'world.planted[{i}].count'={p.count} must be below "
                      f"world.n_items={w.n_items}")
        if sum(p.count for p in w.planted) >= w.n_items:
            _fail(f"world.planted counts add up to {sum(p.count for p in w.planted)}, not below "
                  f"world.n_items={w.n_items}")
    if w.kind != "toy":
        if not w.root:
            _fail(f"world.kind={w.kind} needs world.root (" + {
                "folder": "a folder of image + .txt pairs, a .tar shard, or a text file "
                          "listing shards)",
                "coco": "an MSCOCO 2017 folder: annotations/captions_train2017.json and "
                        "train2017/; coco_mini.yaml takes it as data.root=PATH)",
                "encoded": "the folder `attribution coco-encode` wrote)"}[w.kind])
        if w.planted:
            _fail("world.planted is for the toy world; set world.planted=[] for a "
                  f"{w.kind} world")
    if w.kind == "encoded" and g.codec != "vae":
        _fail("world.kind=encoded holds VAE latents: set generator.codec=vae and "
              "generator.vae_path to the VAE the encoding used")


def _validate_generator(cfg: DictConfig) -> None:
    """The generator's architecture against the world, and its schedule."""
    w, g, u = cfg.world, cfg.generator, cfg.generator.unet
    if g.codec == "vae" and not g.vae_path:
        _fail("generator.codec=vae needs generator.vae_path (an AutoencoderKL folder)")
    if g.weights and g.pretrained:
        _fail("set generator.weights or generator.pretrained, not both")
    if not g.pretrained:  # a pretrained folder brings its own architecture
        n = len(u.block_out_channels)
        if not len(u.down_block_types) == len(u.up_block_types) == n:
            _fail(f"generator.unet: block_out_channels, down_block_types and up_block_types "
                  f"must have the same length, got {n}, {len(u.down_block_types)}, "
                  f"{len(u.up_block_types)}")
        bad = [c for c in u.block_out_channels if c % u.norm_num_groups]
        if bad:
            _fail(f"generator.unet.norm_num_groups={u.norm_num_groups} must divide every "
                  f"block_out_channels entry; it does not divide {bad}")
        if w.kind != "encoded":  # an encoding's size is its own (checked against it)
            size = w.image_size // 8 if g.codec == "vae" else w.image_size
            if g.codec == "vae" and w.image_size % 8:
                _fail(f"world.image_size={w.image_size} must be a multiple of 8 for the VAE codec")
            if size % 2 ** (n - 1):
                _fail(f"world.image_size={w.image_size} gives a {size}-pixel model input, which "
                      f"{n} UNet blocks cannot halve {n - 1} times: use a multiple of "
                      f"{2 ** (n - 1) * (8 if g.codec == 'vae' else 1)}")
    ranks = g.train.devices * g.train.num_nodes
    if g.train.batch_size % ranks:
        _fail(f"generator.train.batch_size={g.train.batch_size} (the global batch) must be "
              f"divisible by generator.train.devices x num_nodes = {ranks}")
    if cfg.teacher.fisher_precision != "fp32" and cfg.teacher.fisher == "diagonal":
        _fail(f"teacher.fisher_precision={cfg.teacher.fisher_precision} is for the EK-FAC "
              "Fisher; the diagonal Fisher's per-sample gradients (torch.func) fail under "
              "autocast: set teacher.fisher_precision=fp32")
    if cfg.teacher.fisher_precision == "fp16" and cfg.device != "cuda":
        _fail(f"teacher.fisher_precision=fp16 needs device=cuda (its loss scaling is CUDA's), "
              f"got device={cfg.device}: use bf16 on other devices")
    if g.train.precision == "fp16" and cfg.device != "cuda":
        _fail(f"generator.train.precision=fp16 needs device=cuda (its loss scaling is CUDA's), "
              f"got device={cfg.device}: use bf16 on other devices")
    if g.beta_end <= g.beta_start:
        _fail(f"generator.beta_end={g.beta_end} must exceed generator.beta_start={g.beta_start}")
    if cfg.queries.sampling.steps > g.num_train_timesteps:
        _fail(f"queries.sampling.steps={cfg.queries.sampling.steps} exceeds "
              f"generator.num_train_timesteps={g.num_train_timesteps}")


def _validate_teacher(cfg: DictConfig) -> None:
    """Queries and the teacher against the world and the generator."""
    w, g = cfg.world, cfg.generator
    q, t = cfg.queries, cfg.teacher
    n_test_concepts, n_forced = len(planted_for(w, "test")), len(val_concept_rows(cfg))
    if w.kind == "toy" and q.planted_test * n_test_concepts > q.n_test:
        _fail(f"queries.planted_test={q.planted_test} x {n_test_concepts} test concepts "
              f"exceeds queries.n_test={q.n_test}")
    if n_forced >= q.n_train:
        _fail(f"queries.planted_val={q.planted_val} x {len(planted_for(w, 'val'))} validation "
              f"concepts leaves none of queries.n_train={q.n_train} to train on")
    for key, steps in (("teacher.timesteps", t.timesteps),
                       ("baselines.dtrak_timesteps", cfg.baselines.dtrak_timesteps)):
        bad_t = [s for s in steps if not 0 <= s < g.num_train_timesteps]
        if bad_t:
            _fail(f"Config key '{key}' must lie in [0, {g.num_train_timesteps}) "
                  f"(generator.num_train_timesteps); bad: {bad_t}")
    if w.kind != "encoded" and t.k > w.n_items:
        _fail(f"teacher.k={t.k} exceeds world.n_items={w.n_items}")
    if w.kind != "encoded" and t.captions > w.captions_per_item:
        _fail(f"teacher.captions={t.captions} exceeds world.captions_per_item="
              f"{w.captions_per_item}")


def _validate_student(cfg: DictConfig) -> None:
    """Feature spaces and the student against the data and the teacher."""
    s = cfg.student
    if cfg.data.source == "toy":
        for space in cfg.features.spaces:
            parts = str(space).split("+")
            unknown = [p for p in parts if p not in FEATURE_EXTRACTORS]
            if unknown or len(set(parts)) != len(parts):
                close = difflib.get_close_matches(unknown[0], FEATURE_EXTRACTORS, n=2) \
                    if unknown else []
                hint = f" Did you mean {close}?" if close else ""
                _fail(f"Config key 'features.spaces' names {space!r}: each '+'-part must be one "
                      f"of {list(FEATURE_EXTRACTORS)}, each once.{hint}")
    for section in ("weights", "arch"):
        for name, value in cfg.features[section].items():
            if not isinstance(value, str) or not value.strip():
                _fail(f"Config key 'features.{section}.{name}' must be a "
                      f"{'file path' if section == 'weights' else 'model name'}, got {value!r}")
    if len(set(cfg.features.spaces)) != len(cfg.features.spaces):
        _fail(f"Config key 'features.spaces' repeats a space: {list(cfg.features.spaces)}")
    if s.feature not in cfg.features.spaces:
        _fail(f"student.feature={s.feature!r} is not among features.spaces "
              f"{list(cfg.features.spaces)}")
    if s.anchor_basis != "uniform" and s.anchor <= 0:
        _fail(f"student.anchor_basis={s.anchor_basis} shapes the anchor's pull, but "
              f"student.anchor={s.anchor}: set student.anchor > 0 too")
    ranks = s.devices * s.num_nodes
    if s.queries_per_batch % ranks:
        _fail(f"student.queries_per_batch={s.queries_per_batch} (the global batch) must be "
              f"divisible by student.devices x student.num_nodes = {ranks}")
    if s.head == "linear" and s.layernorm:
        _fail("student.layernorm is not offered for student.head=linear (it would change the "
              "identity the linear head starts from)")
    if s.val_queries >= 1 and s.val_queries != int(s.val_queries):
        _fail(f"student.val_queries={s.val_queries}: a fraction below 1 or a whole count")
    if s.select == "last" and s.patience is not None:
        _fail("student.select=last keeps the last epoch: early stopping (student.patience) "
              "would cut it short on validation; set student.patience=null")
    if s.patience is not None and s.val_queries == 0:
        _fail("student.patience needs validation queries (student.val_queries > 0)")
    if s.m is not None and s.budget is not None:
        _fail("set student.m or student.budget, not both")
    if cfg.data.source == "toy":
        _validate_student_counts(cfg)


def _validate_student_counts(cfg: DictConfig) -> None:
    """The student's query and candidate counts against the toy world's queries and
    teacher (known at load for data the pipeline makes)."""
    w, q, s, t = cfg.world, cfg.queries, cfg.student, cfg.teacher
    if s.m is not None and s.m > t.k:
        _fail(f"student.m={s.m} exceeds the teacher's candidates teacher.k={t.k}")
    n_val = val_count(q.n_train, s.val_queries)
    if n_val >= q.n_train:
        _fail(f"student.val_queries={s.val_queries} holds out {n_val} of the "
              f"{q.n_train} training queries (queries.n_train): none would be left to train")
    if s.n_queries is not None and s.n_queries > q.n_train - n_val:
        _fail(f"student.n_queries={s.n_queries} exceeds the {q.n_train - n_val} training "
              f"queries left after student.val_queries={s.val_queries} are held out")
    nq = s.n_queries or q.n_train - n_val
    if s.budget is not None and not 1 <= s.budget // nq <= t.k:
        _fail(f"student.budget={s.budget} over {nq} queries keeps {s.budget // nq} "
              f"candidates per query, outside [1, teacher.k={t.k}]")
    validation_k(s.k_val, s.k_eval, t.k)
    if w.kind != "encoded" and min(s.k_eval) > w.n_items:
        _fail(f"student.k_eval={list(s.k_eval)}: every k exceeds world.n_items="
              f"{w.n_items}")


def _validate_abc(cfg: DictConfig) -> None:
    """The customization benchmark's spaces and counts."""
    s = cfg.student
    a = cfg.abc
    spaces = list(a.spaces) or list(cfg.features.spaces)
    bad = [sp for sp in [*spaces, *a.tuned_spaces] if sp not in cfg.features.spaces]
    if bad:
        _fail(f"abc.spaces / abc.tuned_spaces name spaces not in features.spaces: {bad}")
    if s.feature not in spaces:
        _fail(f"abc.spaces must include the student's space {s.feature!r}")
    if a.calibration_concepts >= a.n_train:
        _fail(f"abc.calibration_concepts must be in 1..abc.n_train-1 (n_train={a.n_train}), "
              f"got {a.calibration_concepts}")
    if a.teacher_images > a.images:
        _fail(f"abc.teacher_images={a.teacher_images} exceeds abc.images={a.images}")


def planted_for(world, queries: str) -> list:
    """The planted concepts whose ``queries`` are ``"test"`` or ``"val"`` (toy world)."""
    return [p for p in world.planted if p.queries == queries] if world.kind == "toy" else []


def val_concept_rows(cfg) -> list[int]:
    """Training-query rows that prompt a validation concept: the LAST ``queries.planted_val``
    per concept, in ``world.planted`` order (the queries stage writes them there; the student
    holds them out for validation; the first rows, which the ceiling's curation recall and
    ``student.n_queries`` read, stay ordinary).  None for released data or a world without
    such concepts."""
    if cfg.data.source == "released":
        return []
    n = cfg.queries.planted_val * len(planted_for(cfg.world, "val"))
    return list(range(cfg.queries.n_train - n, cfg.queries.n_train)) if n else []


def validation_k(k_val: int | None, k_eval, n_candidates: int) -> int:
    """The validation positives per query: ``student.k_val``, or derived from the smallest
    ``student.k_eval`` and the K candidates per training query, min(k_eval, K // 10); an
    explicit k_val above K / 2 is a ConfigError (half the K-set or more positive: validation
    would mostly ask that the K-set come first, which is stage 1's own choice)."""
    if k_val is None:
        return max(1, min(min(k_eval), n_candidates // 10))
    if k_val > n_candidates // 2:
        raise ConfigError(f"student.k_val={k_val} is more than half of the K={n_candidates} "
                          f"candidates per training query; use at most {n_candidates // 2} "
                          f"(or leave it unset: min(smallest student.k_eval, K/10) = "
                          f"{max(1, min(min(k_eval), n_candidates // 10))})")
    return k_val


def val_count(n_train: int, val_queries: float) -> int:
    """How many of ``n_train`` training queries ``student.val_queries`` holds out (a fraction
    below 1 rounds to at least one query; a value >= 1 is a count)."""
    if val_queries <= 0:
        return 0
    if val_queries < 1:
        return max(1, round(n_train * val_queries))
    return int(val_queries)
