"""The config schema: one dataclass per section, each field with its default and its rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attribution.config.generator_schema import (  # noqa: F401  (sections of the schema)
    DOWN_BLOCKS,
    STRATEGIES,
    UP_BLOCKS,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplingConfig,
    TextEncoderConfig,
    UNetConfig,
)
from attribution.config.rules import opt

POSITIVE = {"ge": 1}  # counts
PARAM_GROUPS = ("cross_attn_kv", "cross_attn", "attn", "all")  # teacher/params.py GROUPS
# The format of every cached stage and sweep row: part of each stage key (stage_table.py) and
# of a sweep row's config hash (load.py run_hash).  Raised when a default or a stage's output
# changes meaning; a run folder made under another format is refused with one line
# (pipeline.py), instead of defaults being frozen to keep old keys.  History: CHANGELOG.md.
FORMAT_VERSION = 2
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
    # Which queries prompt it: test (queries.planted_test test queries each: the reported
    # known-answer recall) | val (queries.planted_val training queries each, always held out for
    # validation and never trained on: choosing on validation then sees what an unseen rare
    # concept costs, as the test queries do, without reading them).
    queries: str = opt("test", choices=["test", "val"])


@dataclass
class WorldConfig:
    # toy (procedural, generated here) | folder (image + .txt pairs, or shards) | coco (a raw
    # MSCOCO 2017 folder, encoded inside the run: data/coco.py) | encoded (an `attribution
    # coco-encode` folder: latents + token states, no images; see data/encoded.py)
    kind: str = opt("toy", choices=["toy", "folder", "coco", "encoded"])
    # folder worlds: a folder, a .tar shard, or a list of shards; coco: the folder holding
    # annotations/captions_train2017.json and train2017/; encoded: the encoding's folder
    root: str | None = None
    # the toy world's size; for folder and coco worlds the most items read (coco: lowest ids)
    n_items: int = opt(1200, ge=2)
    image_size: int = opt(16, ge=8, le=4096)
    captions_per_item: int = opt(3, **POSITIVE)
    # Skew of every attribute's distribution: p_k ∝ (k+1)^-zipf.  0 = uniform; larger = rarer tails.
    zipf: float = opt(0.7, ge=0, le=10)
    planted: list[PlantedConcept] = field(
        default_factory=lambda: [
            PlantedConcept("shape", "cross", 8),
            PlantedConcept("colour", "pink", 8),
            PlantedConcept("shape", "heart", 8, "val"),
            PlantedConcept("colour", "orange", 8, "val"),
        ]
    )


@dataclass
class QueriesConfig:
    n_train: int = opt(120, **POSITIVE)
    n_test: int = opt(20, **POSITIVE)  # scored by the teacher over the WHOLE training set
    planted_test: int = opt(4, ge=0)  # test queries per test concept (known answers)
    # validation queries per validation concept (world.planted[i].queries=val): the last
    # training queries, held out of training by the student whatever student.val_queries says
    planted_val: int = opt(3, ge=0)
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
    # the Fisher's items: None = every training item (EK-FAC: kronfluence's default cap of
    # 100,000 examples lifted), else this many drawn at random with the run's seed
    fisher_items: int | None = opt(None, **POSITIVE)
    fisher_batch_size: int = opt(32, **POSITIVE)
    # the EK-FAC fit's forward and backward passes: fp32 | bf16 (autocast; the covariances and
    # the eigendecomposition stay float32 / float64) | fp16 (autocast + loss scaling, CUDA
    # only).  The diagonal Fisher and the scoring stay float32 (bf16 destroyed the scoring's
    # rankings: docs/benchmarks.md)
    fisher_precision: str = opt("fp32", choices=["fp32", "bf16", "fp16"])
    eta: float = opt(0.01, gt=0)  # step size of the one natural-gradient ascent step
    # the candidates' loss change after the step: "quadratic" (this project's teacher) its
    # second-order model from predictions along d (attribution/teacher/predictions.py): its
    # rankings are stable to a 10x step, where the exact ascent's move (docs/results.md "The
    # teacher"); "ascent" takes the step and measures it (the published AbU+: preset:abu_plus)
    estimator: str = opt("quadratic", choices=["ascent", "quadratic"])
    # the quadratic estimator's J·d: "forward" (θ0 + sη·d against θ0's predictions of every item,
    # held in memory: one sweep a query; N x samples x sample size x 4 bytes, refused above
    # 2 GiB) or "central" (θ0 ± sη·d: two sweeps a query, nothing held: any world)
    difference: str = opt("forward", choices=["central", "forward"])
    gain: float | None = opt(None, gt=0)  # Fisher gain s; None = gain_scale's
    # the gain when `gain` is unset: N (the number of training items: this project's toy
    # teacher) | N2 = N² (the published AbU+, docs/method.md §2: a step N times smaller)
    gain_scale: str = opt("N", choices=["N", "N2"])
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
    # stage-1 space: the caption's token states (text), the image (pixels) or both; caption
    # space keeps the most of this teacher's top 10 (it unlearns cross-attention K/V):
    # docs/results.md "The teacher"
    curation: str = opt("text", choices=["pixels", "text", "pixels+text"])
    devices: int = opt(1, **POSITIVE)  # Lightning devices (per node) that split the queries
    num_nodes: int = opt(1, **POSITIVE)  # nodes (torchrun / SLURM: one process per device)
    # Lightning strategy: auto (ddp when devices x nodes > 1, launched by torchrun/SLURM or
    # by Lightning re-running the command) | ddp | ddp_spawn (in-process spawn: notebooks, tests)
    strategy: str = opt("auto", choices=STRATEGIES)
    # how long a rank waits at a barrier for the others (torch's default, 30 min, is shorter
    # than the hours by which teacher ranks can finish apart)
    timeout_hours: float = opt(24.0, gt=0)


@dataclass
class CeilingConfig:
    """What the teacher's rankings are worth (attribution/teacher/ceiling.py): its agreement
    with itself under fresh noise (teacher.self_mAP@k) and its stage-1 curation recall."""

    enabled: bool = True
    test_queries: int | None = opt(None, **POSITIVE)  # test queries rescored (None = all)
    curation_queries: int = opt(8, ge=0)  # training queries scored over the whole set
    seed_offset: int = opt(1, ge=1)  # the replicate's scoring seed is seed + seed_offset


@dataclass
class SecondTeacherConfig:
    """A second teacher that ranks the test queries only (attribution/teacher/second.py): every
    method is also scored against it, beside the run's teacher (which the student trains on)."""

    enabled: bool = False
    name: str = "published AbU+"  # what the report calls it
    # a preset (attribution/config/presets/) merged over the run's teacher section, then
    # `teacher`; None = the run's teacher with `teacher` alone
    preset: str | None = "abu_plus_step"
    teacher: dict[str, Any] = field(default_factory=dict)  # teacher keys over the preset


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
    # linear (D -> D from the identity: the recommendation, docs/results.md "The student") |
    # residual (x + MLP(x), last layer zero) | mlp (the paper's, random init:
    # preset:paper_student).  linear and residual rank exactly as the untuned features at step 0
    head: str = opt("linear", choices=["mlp", "linear", "residual"])
    # head dims after the input (mlp: the layers' widths; residual: the branch's; linear: unused)
    hidden: list[int] = opt(factory=lambda: [768, 768, 768, 768], ge=1, nonempty=True)
    dropout: float = opt(0.1, ge=0, lt=1)
    layernorm: bool = False
    # Whiten the input features first (shrinkage s > 0; 0 = off): x -> (x - mu) W with
    # W = V diag((lam + s*lam_max)^-1/2) V^T from the training items' feature covariance, so a
    # direction few items vary along (a rare attribute) counts for more.  The head then starts
    # from the whitened features' ranking.  docs/method.md §3.  Off by default: it helped where
    # rare attributes decide (the toy world, 0.01 chosen on validation) and hurt where most
    # feature directions are nuisance (the released-layout test sets): choose it on validation
    # for your features (sweeps/head.yaml).
    whiten: float = opt(0.0, ge=0)
    # Initial α of s = α·cos + β (α > 0 always).  5 gives σ(s) the range of the soft targets from
    # the start; with 1, cross-entropy trained far slower on the toy world (mAP@10 0.28 vs 0.37).
    alpha_init: float = opt(5.0, gt=0)
    # listwise (ours: it beat cross-entropy with every head, on the toy world and the recovery
    # sets: docs/results.md "The student") | ce (the paper's) | mse | ordinal
    loss: str = opt("listwise", choices=["ce", "mse", "ordinal", "listwise"])
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
    # λ of the pull λ·Σ‖θ − θ₀‖²/Σ‖θ₀‖² of the head's weights toward their start (L2-SP,
    # relative to the start's size so λ means the same at any width; 0 = off).  A linear head
    # starts at the identity on whitened features, which ranks the planted concepts' items
    # first; training on queries that never name them moves those directions by noise alone,
    # and the pull keeps them (docs/method.md §3).  Off by default: it serves a whitened head
    # that must keep rare directions (the toy world's value: sweeps/anchor.yaml).
    anchor: float = opt(0.0, ge=0)
    # uniform: the pull above | queries: the first layer's pull measured by P = (I + C/c̄)⁻¹, C
    # the training queries' second moment in the head's input space — full along directions no
    # training query carries, weaker the more they use one (student/head.py query_metric).
    anchor_basis: str = opt("uniform", choices=["uniform", "queries"])
    k_eval: list[int] = opt(factory=lambda: [10, 50, 100], ge=1, nonempty=True)
    # Training queries held out for validation (never trained on): a fraction (< 1) or a count.
    # Early stopping, the reported epoch and sweep winners are chosen on them; the test queries
    # are read once, after training.  0 = no validation (the last epoch is reported).
    val_queries: float = opt(0.1, ge=0)
    # validation positives: the teacher's top k_val of each validation query's K-set; None =
    # min(smallest student.k_eval, K / 10).  At most K / 2 (checked): the larger the share of
    # the K-set that is positive, the more validation rewards stage 1's own choice of K-set.
    k_val: int | None = opt(None, **POSITIVE)
    # where they are ranked: kset = among the K-set (chosen by benchmarks/validation_study.py:
    # docs/benchmarks.md "Validation rules") | sampled = among the K-set and student.val_outside
    # items drawn at random from outside it | full = among every item (counts the items stage 1
    # left out as misses: it favours the stage-1 features and kept raw cosine at k_val = K/2)
    val_scope: str = opt("kset", choices=["kset", "sampled", "full"])
    val_outside: int | None = opt(None, **POSITIVE)  # sampled: items from outside; None = K
    patience: int | None = opt(None, **POSITIVE)  # stop after this many epochs without a better
    # validation mAP (None = run every epoch); the best epoch is the one kept either way
    # best: keep the epoch validation scores highest (the untrained head, epoch 0, included) |
    # last: keep the last epoch, validation only logged (the paper's recipe: preset:paper_student)
    select: str = opt("best", choices=["best", "last"])
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
    # released: read the released MSCOCO files (docs/method.md §6) under `root`; only the student runs.
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
    second_teacher: SecondTeacherConfig = field(default_factory=SecondTeacherConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    abc: AbcConfig = field(default_factory=AbcConfig)



