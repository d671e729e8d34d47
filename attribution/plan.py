"""``attribution plan CONFIG``: the bill before paying it — per stage, the generator forwards,
the bytes it writes and reads, its largest array in memory, and hours at a given throughput.

Counts are exact for the stages that run the generator as the code does (the teacher, its
ceiling and a second teacher: tests/test_plan.py counts a real run's forward rows and finds
the same numbers); the generator's training, the queries' sampling and the Fisher are counted
from their schedules.  A forward *row* is one sample through the UNet; a backward row costs
about two, so hours are taken over fwd + 2·bwd rows at ``forwards_per_second``.  Sizes are
estimates of the arrays each stage writes and holds (float32 unless said).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attribution.config import second_teacher_config

# generator forward rows per second measured here: the teacher's loop over the toy UNet
# (1.97 M parameters, 16x16 pixels) on 2 CPU cores at batch 500 (604-610 rows/s,
# docs/benchmarks.md "Against the physical limit"); another CPU or a GPU: ``--measure``
DEFAULT_FPS = 600.0


@dataclass
class StagePlan:
    stage: str
    fwd: int = 0  # forward rows
    bwd: int = 0  # backward rows
    written: int = 0  # bytes left on disk
    peak: int = 0  # bytes of the largest array held in memory
    devices: int = 1  # devices that split the work
    notes: list[str] = field(default_factory=list)

    def hours(self, fps: float, devices: int | None = None) -> float:
        return (self.fwd + 2 * self.bwd) / fps / (devices or 1) / 3600


def manifest_path(cfg) -> Path:
    """Where an encoded world's manifest lies: ``world.root``/manifest.json."""
    return Path(cfg.world.root or "") / "manifest.json"


def encoded_manifest(cfg) -> Path | None:
    """An encoded world's manifest at ``world.root``, where it is there (None for other kinds)."""
    manifest = manifest_path(cfg)
    return manifest if cfg.world.kind == "encoded" and manifest.is_file() else None


def n_items(cfg) -> int | None:
    """The training set's size: the toy world's setting, an encoded world's manifest, or None
    (a folder world is counted when its world stage runs)."""
    if cfg.world.kind == "toy":
        return cfg.world.n_items
    manifest = encoded_manifest(cfg)
    if manifest:
        return int(json.loads(manifest.read_text())["n_items"])
    captions = Path(cfg.world.root or "") / "annotations" / "captions_train2017.json"
    if cfg.world.kind == "coco" and captions.is_file():
        try:
            return min(cfg.world.n_items, len(json.loads(captions.read_text("utf-8"))["images"]))
        except (ValueError, KeyError, TypeError):
            return None  # the world stage says what is wrong with it
    return None


def image_size(cfg) -> int:
    """The side of the world's images: an encoded world's manifest records it (where it can
    be read); every other world makes its images at ``world.image_size``."""
    manifest = encoded_manifest(cfg)
    if manifest:
        try:
            return int(json.loads(manifest.read_text())["image_size"])
        except (ValueError, KeyError, TypeError):
            pass  # the world stage says what is wrong with it
    return cfg.world.image_size


def model_shape(cfg) -> tuple[int, int]:
    """(channels, side) of one sample in the generator's space: VAE latents or pixels."""
    vae = cfg.generator.codec == "vae"
    return (4, image_size(cfg) // 8) if vae else (3, image_size(cfg))


def sample_shape(cfg) -> tuple[int, int]:
    """(elements of one model-space sample, token states per caption L x D)."""
    channels, size = model_shape(cfg)
    return channels * size * size, cfg.text_encoder.max_length * cfg.generator.unet.cross_attention_dim


def samples_per_item(tc) -> int:
    """(view, caption, timestep) samples a candidate's loss averages over."""
    return (2 if tc.flips else 1) * tc.captions * len(tc.timesteps)


def per_query(tc, candidates: int) -> tuple[int, int]:
    """(fwd, bwd) rows of one query: the query gradient (draws fwd + bwd), the candidates'
    sweep(s) (two for the central difference), the query's own loss after the step."""
    sweeps = 2 if (tc.estimator == "quadratic" and tc.difference == "central") else 1
    return 2 * tc.query_draws + sweeps * candidates * samples_per_item(tc), tc.query_draws


def once_per_scorer(tc, n: int) -> int:
    """Rows a scorer spends once: the base losses L_j(θ0) of every item, and θ0's prediction
    table for the forward difference."""
    table = tc.estimator == "quadratic" and tc.difference == "forward"
    return n * samples_per_item(tc) * (2 if table else 1)


def teacher_plan(cfg, n: int, stage: str = "teacher", tc=None, train: int | None = None,
                 test: int | None = None) -> StagePlan:
    """A teacher scoring ``train`` queries over their K-sets and ``test`` over all n items."""
    tc = tc or cfg.teacher
    train = cfg.queries.n_train if train is None else train
    test = cfg.queries.n_test if test is None else test
    f_train, b_train = per_query(tc, min(tc.k, n))
    f_test, b_test = per_query(tc, n)
    elems, _ = sample_shape(cfg)
    p = StagePlan(stage, fwd=once_per_scorer(tc, n) + train * f_train + test * f_test,
                  bwd=train * b_train + test * b_test, devices=tc.devices * tc.num_nodes)
    # shards + merged arrays + released pickles: ~44 bytes a (query, candidate)
    p.written = 44 * (train * min(tc.k, n) + test * n)
    table = n * samples_per_item(tc) * elems * 4
    if tc.estimator == "quadratic" and tc.difference == "forward":
        p.peak = table
        p.notes.append(f"holds θ0's predictions: {_human(table)}")
    else:
        p.peak = test * n * 12
    return p


def ceiling_plan(cfg, n: int) -> StagePlan:
    """The replicate (its own base losses and tables: fresh noise) and the curation queries
    (the teacher's cached base losses; a new prediction table for the forward difference)."""
    cc, tc = cfg.ceiling, cfg.teacher
    rep = min(cc.test_queries or cfg.queries.n_test, cfg.queries.n_test)
    cur = min(cc.curation_queries, cfg.queries.n_train)
    p = StagePlan("ceiling", devices=tc.devices * tc.num_nodes)
    f, b = per_query(tc, n)
    table = n * samples_per_item(tc) if tc.estimator == "quadratic" and \
        tc.difference == "forward" else 0
    if rep:
        p.fwd += once_per_scorer(tc, n) + rep * f
        p.bwd += rep * b
    if cur:
        p.fwd += table + cur * f
        p.bwd += cur * b
    p.written = 4 * n * (rep + cur)
    return p


def plan(cfg, n: int | None = None) -> list[StagePlan]:
    """Every stage this config runs that costs generator forwards or disk."""
    n = n or n_items(cfg)
    if n is None:
        raise ValueError("the number of training items is not known before the world stage "
                         "runs: pass --items N")
    g, q, tc = cfg.generator, cfg.queries, cfg.teacher
    elems, tokens = sample_shape(cfg)
    guidance = 2 if q.sampling.guidance > 0 else 1
    pixels = n * cfg.world.image_size ** 2 * 3  # the images, uint8, held while they are made
    out = [StagePlan("world", written=pixels if cfg.world.kind != "encoded" else 0,
                     peak=pixels if cfg.world.kind != "encoded" else n * elems * 8),
           # a COCO or encoded world's token states are its encoding's: the text stage
           # points at them
           StagePlan("text", written=0 if cfg.world.kind in ("coco", "encoded") else
                     n * cfg.world.captions_per_item * tokens * 2)]
    if cfg.world.kind == "encoded" and not encoded_manifest(cfg):
        out[0].notes.append(f"no encoding at world.root ({manifest_path(cfg)} is missing): "
                            f"sizes assume world.image_size={cfg.world.image_size} (the "
                            f"paper's generator: 128)")
    if cfg.world.kind == "coco":  # two views of every item + every caption's token states
        out.insert(1, StagePlan("encode", written=n * (2 * elems * 4 + cfg.world.captions_per_item
                                                      * tokens * 2)))
    gen = StagePlan("generator", devices=g.train.devices * g.train.num_nodes)
    if not (g.weights or g.pretrained):
        gen.fwd = gen.bwd = g.train.steps * g.train.batch_size
    out += [gen, StagePlan("queries", fwd=(q.n_train + q.n_test) * q.sampling.steps * guidance,
                           written=(q.n_train + q.n_test) * (elems * 4 + tokens * 4))]
    draws = n * tc.fisher_epochs if tc.fisher_items is None else \
        min(tc.fisher_items, n) * tc.fisher_epochs
    passes = 1 if tc.fisher == "diagonal" else 2  # EK-FAC: covariances, then eigenvalues
    out.append(StagePlan("fisher", fwd=passes * draws, bwd=passes * draws))
    out.append(teacher_plan(cfg, n))
    if cfg.ceiling.enabled:
        out.append(ceiling_plan(cfg, n))
    if cfg.second_teacher.enabled:
        second = second_teacher_config(cfg).teacher
        out.append(teacher_plan(cfg, n, "second_teacher", second, train=0))
    return out


def _human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1024 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TB"


def rows_per_second(step: Callable[[], None], rows: int, seconds: float,
                    clock: Callable[[], float] = time.perf_counter, min_calls: int = 2
                    ) -> tuple[float, float]:
    """Rows a second of ``step`` (each call passes ``rows``): one untimed warm-up call, then
    calls until ``seconds`` have passed and at least ``min_calls`` were timed.
    -> (rows/s, seconds timed)."""
    step()
    calls, start = 0, clock()
    while True:
        step()
        calls += 1
        elapsed = clock() - start
        if calls >= min_calls and elapsed >= seconds:
            return calls * rows / elapsed, elapsed


def config_unet(cfg, batch: int, device: str = "cpu") -> tuple:
    """This config's UNet (random weights seeded 0, or a ``generator.pretrained`` folder's) and
    one random batch of the run's shapes for it: -> (unet, (x_t, t, token states)) on
    ``device``.  Throughput does not depend on the values."""
    from types import SimpleNamespace

    import torch

    from attribution.generator.model import build_unet, load_pretrained_unet

    g = cfg.generator
    channels, size = model_shape(cfg)
    shape = SimpleNamespace(channels=channels, size=size)
    torch.manual_seed(0)  # the same weights and batch at every call
    unet = (load_pretrained_unet(g, shape, g.pretrained) if g.pretrained
            else build_unet(g, shape)).to(device)
    x = torch.randn(batch, channels, size, size, device=device)
    t = torch.randint(0, g.num_train_timesteps, (batch,), device=device)
    cond = torch.randn(batch, cfg.text_encoder.max_length, unet.config.cross_attention_dim,
                       device=device)
    return unet, (x, t, cond)


def measure_forwards_per_second(cfg, seconds: float = 10.0) -> tuple[float, str]:
    """This config's UNet on this machine's device for ``cfg.device``, timed now: forward
    rows a second at the teacher's batch size under ``no_grad`` (the teacher's own loop runs at
    99 % of this, docs/benchmarks.md), on random inputs of the run's shapes (latents, timesteps,
    token states).  Its weights are random (a ``generator.pretrained`` folder's are loaded): the
    rate does not depend on their values.  -> (rows/s, what was timed)."""
    import torch

    from attribution.common.devices import check_device, torch_device

    check_device(cfg.device)
    device = torch_device(cfg.device)
    b = cfg.teacher.batch_size
    unet, (x, t, cond) = config_unet(cfg, b, device)
    unet.eval()
    channels, size = x.shape[1], x.shape[-1]

    @torch.no_grad()
    def step() -> None:
        unet(x, t, cond)
        if device == "cuda":
            torch.cuda.synchronize()

    rate, timed = rows_per_second(step, b, seconds)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    return rate, (f"measured now: this config's UNet ({params:.1f} M parameters, "
                  f"{channels}x{size}x{size}) on {device}, batches of {b}, timed {timed:.1f} s")


def format_plan(stages: list[StagePlan], fps: float = DEFAULT_FPS,
                source: str | None = None) -> str:
    """A table: rows, disk, peak memory, hours on one device and on the configured devices."""
    lines = [f"{'stage':<15}{'fwd rows':>16}{'bwd rows':>14}{'disk':>11}{'peak memory':>13}"
             f"{'hours, 1 device':>17}{'devices':>9}{'hours':>10}"]
    for s in stages:
        lines.append(f"{s.stage:<15}{s.fwd:>16,}{s.bwd:>14,}{_human(s.written):>11}"
                     f"{_human(s.peak):>13}{s.hours(fps):>17.3g}{s.devices:>9}"
                     f"{s.hours(fps, s.devices):>10.3g}")
    total = sum(s.hours(fps, s.devices) for s in stages)
    lines.append(f"{'total':<15}{sum(s.fwd for s in stages):>16,}"
                 f"{sum(s.bwd for s in stages):>14,}{_human(sum(s.written for s in stages)):>11}"
                 f"{_human(max(s.peak for s in stages)):>13}"
                 f"{sum(s.hours(fps) for s in stages):>17.3g}{'':>9}{total:>10.3g}")
    lines.append(f"hours at {fps:.4g} forward rows/s (a backward row counts as 2); "
                 + (source or ("the toy UNet on 2 CPU cores (docs/benchmarks.md): pass "
                               "--measure or --forwards-per-second for your hardware and "
                               "generator" if math.isclose(fps, DEFAULT_FPS) else "as given")))
    lines += [f"  {s.stage}: {note}" for s in stages for note in s.notes]
    return "\n".join(lines)


def _rows(n: int) -> str:
    return f"{n / 1e6:.2g} M" if n >= 1e6 else f"{n:,}"


def _duration(hours: float) -> str:
    return f"{hours:.2g} h" if hours >= 1 else f"{max(hours * 60, 1):.0f} min"


def bill(stages: list[StagePlan], config_path: str = "CONFIG") -> str | None:
    """One line for a run about to start ``stages`` (:func:`check_fits` gives them): their
    generator rows (a stage that resumes counts whole) and hours on the configured devices at
    the default rate; None where none of them runs the generator."""
    work = [s for s in stages if s.fwd or s.bwd]
    if not work:
        return None
    hours = sum(s.hours(DEFAULT_FPS, s.devices) for s in work)
    return (f"{', '.join(s.stage for s in work)}: {_rows(sum(s.fwd for s in work))} forward "
            f"+ {_rows(sum(s.bwd for s in work))} backward generator rows, ~{_duration(hours)} "
            f"at {DEFAULT_FPS:g} rows/s (the toy UNet on 2 CPU cores; a resumed stage counted "
            f"whole; `attribution plan {config_path} --measure` for this machine's rate)")


def check_fits(cfg, root: Path, todo: list[str] | None = None) -> list[StagePlan]:
    """Refuse, before any work, stages (``todo``: the ones about to run; default all) whose
    planned largest array exceeds this machine's available memory or whose planned files
    exceed the free disk under ``root`` (the figures of :func:`plan`); a world whose size is
    not known yet is not checked here.  -> the plans of the stages checked."""
    import shutil

    import psutil

    n = None if cfg.data.source == "released" else n_items(cfg)
    if n is None:
        return []
    stages = [s for s in plan(cfg, n) if todo is None or s.stage in todo]
    if not stages:
        return []
    biggest = max(stages, key=lambda s: s.peak)
    memory = psutil.virtual_memory().available
    if biggest.peak > memory:
        raise ValueError(f"the {biggest.stage} stage would hold {_human(biggest.peak)} in "
                         f"memory and this machine has {_human(memory)} available "
                         f"(`attribution plan` shows every stage's figures)")
    disk_root = next((a for a in [root, *root.parents] if a.exists()), Path("."))
    free = shutil.disk_usage(disk_root).free
    need = sum(s.written for s in stages)
    if need > free:
        raise ValueError(f"this run would write {_human(need)} under {root} and its disk has "
                         f"{_human(free)} free (`attribution plan` shows every stage's figures)")
    return stages
