"""The stage table: what each stage depends on, where its body lives, which command rebuilds
it, and which config it reads (what its cache key hashes).  The pipeline schedules from it."""

from __future__ import annotations

from pathlib import Path

from attribution.config import ConfigError, second_teacher_config, to_dict
from attribution.teacher.formats import FISHER_KEYS, NOISE_VERSION

DEPENDS = {
    "world": [],
    "encode": ["world"],  # a COCO world only; its text stage then reads the encoding
    "text": ["world"],
    "generator": ["text"],
    "queries": ["generator"],
    "fidelity": ["generator"],
    "fisher": ["generator"],
    "teacher": ["fisher", "queries"],
    "ceiling": ["teacher"],
    "second_teacher": ["fisher", "queries"],
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
                  "fisher_batch_size", "timeout_hours",
                  # the Fisher's alone: its stage's key carries it, and every teacher's key
                  # carries the Fisher's
                  "fisher_precision"}
# Student settings that change only placement, logging or the deployed search, never training.
STUDENT_EXECUTION_ONLY = {"num_workers", "logger", "devices", "num_nodes", "strategy", "rerank"}
ORDER = list(DEPENDS)
# The command that (re)builds each stage: named in every error about a stage's files.
COMMAND = {"world": "world", "encode": "run", "text": "text", "generator": "train-generator",
           "queries": "queries", "fidelity": "fidelity", "fisher": "teacher fisher",
           "teacher": "teacher score", "ceiling": "run", "second_teacher": "run", "toyclip": "toyclip",
           "features": "features", "student": "student", "baselines": "run",
           "customize": "customize", "abc_teacher": "abc", "abc": "abc"}
# A pre-encoded world (world.kind=encoded) holds latents and token states, not images: the
# stages that look at images cannot run on it (at MSCOCO scale the student reads the released
# features: data.source=released).
NEEDS_IMAGES = {"fidelity", "toyclip", "features", "student", "baselines", "customize",
                "abc_teacher", "abc"}



def default_stages(cfg) -> list[str]:
    """The stages ``attribution run`` runs for ``cfg``, in order: all but those its world
    cannot or need not run and those switched off."""
    kind = cfg.world.kind
    skip = set(NEEDS_IMAGES) if kind == "encoded" else set()
    if kind != "coco":  # only a raw COCO world is encoded inside the run
        skip.add("encode")
    if kind != "toy":  # fidelity asks the toy world's attributes
        skip.add("fidelity")
    if not cfg.ceiling.enabled:
        skip.add("ceiling")
    if not cfg.second_teacher.enabled:
        skip.add("second_teacher")
    return [s for s in ORDER if (s not in OPTIONAL or cfg.abc.enabled) and s not in skip]


def check_images_needed(cfg, wanted: list[str]) -> None:
    """A pre-encoded world has no images: refuse, naming them, the stages that look at some."""
    if cfg.world.kind == "encoded" and set(wanted) & NEEDS_IMAGES:
        raise ConfigError(
            f"world.kind=encoded has latents and token states but no images, so it cannot "
            f"run {sorted(set(wanted) & NEEDS_IMAGES)}; it runs world, text, generator, "
            "queries, fisher and teacher. Train the student on the released features "
            "(data.source=released), or use world.kind=coco over the raw MSCOCO folder "
            "(configs/experiment/coco_mini.yaml) or world.kind=folder over the images")

# Where each stage's body lives: "module:function", imported when the stage runs (so commands that
# run no stage, like `attribution config`, stay fast).
STAGES = {
    "world": "attribution.data.stage:run_world",
    "encode": "attribution.generator.stages:run_encode",
    "text": "attribution.generator.stages:run_text",
    "generator": "attribution.generator.stages:run_generator",
    "queries": "attribution.generator.stages:run_queries",
    "fidelity": "attribution.fidelity:run_fidelity",
    "fisher": "attribution.teacher.stages:run_fisher",
    "teacher": "attribution.teacher.stages:run_teacher",
    "ceiling": "attribution.teacher.stages:run_ceiling",
    "second_teacher": "attribution.teacher.stages:run_second_teacher",
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


def _abc_sections(cfg) -> tuple[dict, dict]:
    """(what the customize stage reads, what the abc stage reads) of the ``abc`` section."""
    d = to_dict(cfg.abc)
    d["spaces"] = d["spaces"] or list(cfg.features.spaces)
    d.pop("enabled")
    custom = {k: d.pop(k) for k in CUSTOMIZE_KEYS}
    d.pop("teacher_images")  # the abc_teacher stage's
    return custom, d


def key_sections(cfg, stage: str, released_root: Path | None = None) -> list:
    """What a stage's cache key hashes (besides its upstream keys): the config it reads."""
    if stage == "second_teacher":
        return _second_teacher_sections(cfg)
    c = cfg
    return {
        "world": [c.world, c.seed],
        "encode": [{k: c.generator[k] for k in ("codec", "vae_path", "latent_scale")},
                   c.text_encoder, c.seed],
        "text": [c.text_encoder],
        "generator": [_generator_section(c), c.seed],
        "queries": [c.queries, c.seed],
        "fidelity": [c.fidelity, c.queries.sampling, c.seed],
        "fisher": [_fisher_section(c), c.seed],
        "teacher": [{k: v for k, v in to_dict(c.teacher).items()
                     if k not in EXECUTION_ONLY}, c.seed, NOISE_VERSION],
        # a sample of the test queries is stratified by query type (the first rows before)
        "ceiling": [c.ceiling, c.seed, *(["stratified"] if c.ceiling.test_queries is not None
                                         and c.ceiling.test_queries < c.queries.n_test else [])],
        "second_teacher": None,  # derived below, for that stage only (a config merge)
        "toyclip": [{k: v for k, v in to_dict(c.features).items() if k.startswith("toyclip")},
                    c.seed],
        "features": [{k: v for k, v in to_dict(c.features).items()
                      if not k.startswith("toyclip") and k != "batch_size"}],
        "student": [{**{k: v for k, v in to_dict(c.student).items()
                        if k not in STUDENT_EXECUTION_ONLY},
                     "seed": c.seed if c.student.seed is None else c.student.seed}, c.seed,
                    *([str(released_root)] if released_root is not None else [])],
        "baselines": [c.baselines, c.student.k_eval, c.seed],
        "customize": [_abc_sections(c)[0], c.queries.sampling, c.seed],
        "abc_teacher": [{k: v for k, v in to_dict(c.teacher).items()
                         if k not in EXECUTION_ONLY}, c.abc.teacher_images, c.seed,
                        NOISE_VERSION],
        "abc": [_abc_sections(c)[1], c.seed],
    }[stage]


def _fisher_section(c) -> dict:
    """What the Fisher's key hashes: its kind, parameters and draws, and its precision only
    when reduced (fp32 is what every Fisher was fitted in before the setting existed)."""
    t = to_dict(c.teacher)
    return {k: t[k] for k in FISHER_KEYS if k != "fisher_precision"} | (
        {"precision": t["fisher_precision"]} if t["fisher_precision"] != "fp32" else {})


def _generator_section(c) -> dict:
    """The generator's config as its key hashes it: without where it trains (devices, nodes,
    strategy: any layout trains the same generator), and with the training precision only
    when reduced (fp32 is what every generator was trained in before the key existed)."""
    g = to_dict(c.generator)
    drop = {"devices", "num_nodes", "strategy"} | (
        {"precision"} if g["train"].get("precision") == "fp32" else set())
    g["train"] = {k: v for k, v in g["train"].items() if k not in drop}
    return g


def _second_teacher_sections(c) -> list:
    if not c.second_teacher.enabled:
        return ["off"]
    teacher = to_dict(second_teacher_config(c).teacher)
    return [{k: v for k, v in teacher.items() if k not in EXECUTION_ONLY},
            c.second_teacher.name, c.seed, NOISE_VERSION]
