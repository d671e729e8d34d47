"""Teacher entry points: ``fit_fisher`` and ``run_teacher`` (importable, used by the pipeline/CLI)."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from attribution.common.devices import accelerator_for, torch_device
from attribution.common.files import DataFileError, atomic_save_npy, atomic_write_bytes, load_npy
from attribution.common.seeds import seeded_generator
from attribution.config import to_dict
from attribution.data.dataset import read_manifest
from attribution.data.queries import QuerySet
from attribution.data.text_cache import TextTable
from attribution.generator.model import build_codec, build_scheduler, load_unet
from attribution.generator.train import world_latents
from attribution.teacher import curation
from attribution.teacher.candidates import CandidateSet, candidate_losses
from attribution.teacher.fisher import (
    FisherDraws,
    diagonal_fisher,
    ekfac_factors,
    load_fisher,
    save_fisher,
)
from attribution.teacher.module import QueryDataset, ShardWriter, TeacherModule, collate_one
from attribution.teacher.params import select_modules, select_parameters
from attribution.teacher.scorer import AbUScorer, Query
from attribution.teacher.shards import ShardStore, write_merged
from attribution.teacher.unlearn import DiagonalPreconditioner, EKFACPreconditioner

# Files of an unfinished teacher stage (kept so a killed run resumes): on a bad one, say how.
PARTIAL = "delete it; rerunning the teacher recomputes only this part"


def _checked_losses(path: Path, n: int) -> np.ndarray:
    """A cached share of base losses L_j(θ0): float (n, views), finite, or a DataFileError."""
    losses = load_npy(path, "Cached base losses", rebuild=PARTIAL)
    if (losses.ndim not in (1, 2) or losses.shape[0] != n or losses.dtype.kind != "f"
            or not np.isfinite(losses).all()):
        raise DataFileError(f"Cached base losses {path} are {losses.dtype} {losses.shape} "
                            f"(expected {n} rows of finite floats): {PARTIAL}")
    return losses

def load_world_model(cfg, world_dir: Path, text_dir: Path, gen_dir: Path):
    """(unet, generator manifest, alphas_cumprod, CandidateSet) for a trained generator."""
    unet, manifest = load_unet(gen_dir)
    table = TextTable.load(text_dir)
    codec = build_codec(cfg.generator, read_manifest(world_dir)["image_size"])
    cands = CandidateSet(world_latents(codec, world_dir, text_dir)[0], table.rows, table)
    alphas = build_scheduler(cfg.generator).alphas_cumprod
    return unet, manifest, alphas, cands


def fit_fisher(cfg, world_dir: Path, text_dir: Path, gen_dir: Path, out: Path,
               progress: bool = True) -> dict:
    """Fit the configured Fisher (diagonal or EK-FAC) and save it tied to the generator."""
    tc = cfg.teacher
    unet, manifest, alphas, cands = load_world_model(cfg, world_dir, text_dir, gen_dir)
    items = None
    if tc.fisher_items is not None and tc.fisher_items < len(cands):
        items = torch.sort(torch.randperm(len(cands), generator=seeded_generator(
            cfg.seed, 43))[: tc.fisher_items]).values
    draws = FisherDraws(cands, len(alphas), tc.fisher_epochs, cfg.seed, items)
    start = time.time()
    if tc.fisher == "diagonal":
        names = list(select_parameters(unet, tc.params))
        device = torch_device(cfg.device)  # the configured device (a GPU where asked for)
        tensors = diagonal_fisher(unet.to(device), names, alphas, draws, tc.fisher_batch_size,
                                  progress, device=device)
    else:
        tensors = ekfac_factors(unet, list(select_modules(unet, tc.params)), alphas, draws,
                                tc.fisher_batch_size, progress, workdir=out,
                                precision=tc.fisher_precision)
    save_fisher(out, tensors, {"generator_sha256": manifest["weights_sha256"],
                               "kind": tc.fisher, "params": tc.params, "n_items": len(cands),
                               "precision": tc.fisher_precision,
                               "draws": len(draws)})
    return {"kind": tc.fisher, "tensors": len(tensors), "draws": len(draws),
            "seconds": time.time() - start}


def base_losses(cfg, unet, alphas, cands: CandidateSet, out: Path, rank: int = 0,
                world_size: int = 1, barrier=None) -> torch.Tensor:
    """L_j(θ0) for every item, cached in ``out/base_losses.npy`` (keyed by the scoring settings).

    Over several ranks each computes a contiguous share of the items on its device
    (``base_losses.part<r>of<W>.npy``, kept: a killed run reuses finished shares), ``barrier()``
    waits for all shares, every rank assembles them and rank 0 writes the merged cache.  Shares meet on the
    shared filesystem the teacher's query shards already need."""
    tc = cfg.teacher
    key = json.dumps({"timesteps": list(tc.timesteps), "captions": tc.captions,
                      "flips": tc.flips, "seed": cfg.seed})
    path, key_path = out / "base_losses.npy", out / "base_losses.json"
    if path.is_file() and key_path.is_file() and key_path.read_text() == key:
        return torch.from_numpy(_checked_losses(path, len(cands)))
    device = next(unet.parameters()).device
    shares = np.array_split(np.arange(len(cands)), world_size)
    part = out / f"base_losses.part{rank}of{world_size}.npy"
    part_key = out / f"base_losses.part{rank}of{world_size}.json"
    if not (part.is_file() and part_key.is_file() and part_key.read_text() == key):
        losses = candidate_losses(unet, alphas, cands, torch.from_numpy(shares[rank]),
                                  list(tc.timesteps), tc.captions, tc.flips, cfg.seed,
                                  tc.batch_size, device)
        atomic_save_npy(part, losses.numpy())
        atomic_write_bytes(part_key, key.encode())
    if barrier is not None:
        barrier("base losses")
    losses = torch.from_numpy(np.concatenate(
        [_checked_losses(out / f"base_losses.part{r}of{world_size}.npy", len(shares[r]))
         for r in range(world_size)]))
    if rank == 0:
        atomic_save_npy(path, losses.numpy())
        atomic_write_bytes(key_path, key.encode())
    return losses


def scorer_base_losses(cfg, out: Path, scorer: AbUScorer, rank: int, world_size: int,
                        barrier) -> torch.Tensor:
    """``base_losses`` for a scorer on its device (a picklable callable for spawned ranks)."""
    return base_losses(cfg, scorer.unet, scorer.alphas, scorer.cands, out, rank, world_size,
                       barrier)


def teacher_gain(tc, n_items: int) -> float:
    """The Fisher gain s: ``teacher.gain``, else N (``gain_scale: N``) or N² (``N2``)."""
    if tc.gain is not None:
        return float(tc.gain)
    return float(n_items) ** (2 if tc.gain_scale == "N2" else 1)


def load_preconditioner(tc, fisher_dir: Path, generator_sha256: str, n_items: int):
    """The configured Fisher (checked against the generator) as the unlearning step's
    preconditioner, scaled by the gain (:func:`teacher_gain`)."""
    tensors = load_fisher(fisher_dir, generator_sha256, tc.fisher, tc.params)
    gain = teacher_gain(tc, n_items)
    kind = DiagonalPreconditioner if tc.fisher == "diagonal" else EKFACPreconditioner
    return kind(tensors, gain, tc.damping)


def build_scorer(cfg, world_dir, text_dir, gen_dir, fisher_dir, out: Path,
                 eager_base: bool = True, device: str = "cpu"):
    """(scorer, candidates) on ``device``.  ``eager_base=False`` leaves ``scorer.base`` None:
    the teacher's Lightning module computes it on the device, split over the ranks
    (``base_losses``)."""
    tc = cfg.teacher
    out.mkdir(parents=True, exist_ok=True)
    unet, manifest, alphas, cands = load_world_model(cfg, world_dir, text_dir, gen_dir)
    unet = unet.to(device)
    precond = load_preconditioner(tc, fisher_dir, manifest["weights_sha256"], len(cands))
    params = select_parameters(unet, tc.params)
    base = base_losses(cfg, unet, alphas, cands, out) if eager_base else None
    return AbUScorer(unet, alphas, cands, params, precond, base, tc, cfg.seed,
                     device), cands


def test_queries(queries_dir: Path, cands: CandidateSet) -> list[Query]:
    """The test queries, each against every item (what a second teacher or a replicate
    scores; no stage-1 candidates are built)."""
    q = QuerySet(Path(queries_dir) / "query_test", need_embeddings=True)
    every = torch.arange(len(cands))
    return [Query("test", i, torch.from_numpy(q.latents[i]),
                  torch.from_numpy(q.text_embeddings[i]), every) for i in range(len(q))]


def make_queries(cfg, queries_dir: Path, cands: CandidateSet, out: Path) -> list[Query]:
    """Train queries with their stage-1 K-sets (cached), test queries against every item."""
    qs = {split: QuerySet(Path(queries_dir) / f"query_{split}", need_embeddings=True)
          for split in ("train", "test")}
    cand_path = out / "candidates_train.npy"
    if cand_path.is_file():
        knn = load_npy(cand_path, "Stage-1 candidates", rebuild=PARTIAL)
        if knn.shape != (len(qs["train"]), cfg.teacher.k) or knn.dtype.kind not in "iu" or (
                knn.size and not 0 <= knn.min() <= knn.max() < len(cands)):
            raise DataFileError(f"Stage-1 candidates {cand_path} are {knn.dtype} {knn.shape}, "
                                f"expected ids of shape {(len(qs['train']), cfg.teacher.k)}: "
                                f"{PARTIAL}")
    else:
        t = qs["train"]
        items = np.concatenate([curation.stage1_features(cfg.teacher.curation, z, cond)
                                for _, z, cond in cands.chunks()])
        qf = curation.stage1_features(cfg.teacher.curation, torch.from_numpy(t.latents),
                                      torch.from_numpy(t.text_embeddings))
        knn = curation.nearest_items(items, qf, cfg.teacher.k)
        atomic_save_npy(cand_path, knn)
    if knn.max(initial=-1) >= len(cands):
        raise DataFileError(f"{cand_path} names items beyond the {len(cands)} training items")
    queries = []
    for split, q in qs.items():
        for i in range(len(q)):
            c = torch.from_numpy(knn[i]) if split == "train" else torch.arange(len(cands))
            queries.append(Query(split, i, torch.from_numpy(q.latents[i]),
                                 torch.from_numpy(q.text_embeddings[i]), c))
    return queries


def teacher_scorer(cfg, dirs, split: str | None = None):
    """(scorer, candidates, queries of ``split`` or all) from the finished world, text,
    generator, fisher, queries and teacher folders (``dirs``): the teacher as benchmarks and
    tools use it outside its stage."""
    scorer, cands = build_scorer(cfg, dirs["world"], dirs["text"], dirs["generator"],
                                 dirs["fisher"], dirs["teacher"])
    queries = make_queries(cfg, dirs["queries"], cands, dirs["teacher"])
    return scorer, cands, [q for q in queries if split is None or q.split == split]


def run_teacher(cfg, world_dir: Path, text_dir: Path, gen_dir: Path, queries_dir: Path,
                fisher_dir: Path, out: Path, progress: bool = True) -> dict:
    """Score every query not yet scored (one shard each), then merge both splits."""
    out.mkdir(parents=True, exist_ok=True)
    scorer, cands = build_scorer(cfg, world_dir, text_dir, gen_dir, fisher_dir, out,
                                 eager_base=False)
    queries = make_queries(cfg, queries_dir, cands, out)
    store = ShardStore(out)
    done = {s: store.done(s) for s in ("train", "test")}
    todo = [q for q in queries if q.query_id not in done[q.split]]
    start = time.time()
    if todo:
        tc = cfg.teacher
        trainer = L.Trainer(accelerator=accelerator_for(cfg.device), devices=tc.devices,
                            num_nodes=tc.num_nodes, strategy=teacher_strategy(tc),
                            logger=False, enable_progress_bar=False, inference_mode=False,
                            enable_model_summary=False,
                            callbacks=[ShardWriter(store, len(queries), len(queries) - len(todo),
                                                   progress)])
        loader = DataLoader(QueryDataset(todo), batch_size=1, collate_fn=collate_one)
        module = TeacherModule(scorer, functools.partial(scorer_base_losses, cfg, out))
        trainer.predict(module, loader, return_predictions=False)
        if _is_worker_rank(trainer):
            # torchrun / SLURM / ddp: every rank runs this function; rank 0 merges once all
            # shards are on disk, the others wait and return its summary
            trainer.strategy.barrier("shards written")
            trainer.strategy.barrier("merged")
            return json.loads((out / "teacher.json").read_text())["summary"]
        if trainer.world_size > 1 and distributed():
            trainer.strategy.barrier("shards written")
    n = {s: sum(q.split == s for q in queries) for s in ("train", "test")}
    summary = {"queries_scored": len(todo), "seconds": time.time() - start}
    summary.update(merge_outputs(out, n, len(cands)))
    atomic_write_bytes(out / "teacher.json", json.dumps(
        {"config": to_dict(cfg.teacher), "summary": summary}, indent=2).encode())
    if todo and trainer.world_size > 1 and distributed():
        trainer.strategy.barrier("merged")
    return summary


def teacher_strategy(tc):
    """``teacher.strategy`` with the process group's timeout (``teacher.timeout_hours``) when
    several processes score: a rank that finished its share waits at the merge barrier for the
    slowest one, hours later at MSCOCO scale."""
    if tc.devices * tc.num_nodes == 1:
        return tc.strategy
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    timeout = timedelta(hours=tc.timeout_hours)
    if tc.strategy == "ddp_spawn":
        return DDPStrategy(start_method="spawn", timeout=timeout)
    return DDPStrategy(timeout=timeout)


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _is_worker_rank(trainer) -> bool:
    """A non-zero rank of a live process group (ddp launched per process); with ddp_spawn the
    calling process is the launcher and sees the group already torn down."""
    return distributed() and trainer.global_rank != 0


def merge_outputs(out: Path, n_queries: dict[str, int], n_items: int) -> dict:
    """Merge every split's shards into the released layout + ours; per-query cost summary."""
    store = ShardStore(out)
    infos, per_split = [], {}
    for split, n in n_queries.items():
        merged = store.merge(split, n)
        write_merged(out, split, merged, n_items)
        infos += merged["info"]
        per_split[f"seconds_per_{split}_query"] = float(
            np.mean([i["seconds"] for i in merged["info"]]))
    return {
        "seconds_per_query": float(np.mean([i["seconds"] for i in infos])),
        **per_split,
        "query_loss_increase": float(np.mean(
            [i["query_loss_after"] - i["query_loss_before"] for i in infos])),
    }
