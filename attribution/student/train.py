"""Student entry point: ``train_student(cfg, features_dir, teacher_dir, out) -> metrics``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from attribution import retrieval
from attribution.callbacks import RankingMAPCallback, ThroughputCallback
from attribution.config import to_dict
from attribution.data.dataset import DataFileError, atomic_write_bytes
from attribution.features.cache import load_features, load_released_features
from attribution.generator.train import accelerator_for
from attribution.student.data import PairDataModule, load_rankings, select_queries
from attribution.student.head import EmbeddingHead
from attribution.student.losses import build_loss
from attribution.student.module import StudentModule


def space_dir(features_dir: Path, space: str) -> Path:
    return Path(features_dir) / space.replace("+", "__")


def _checked_features(folder: Path, space: str, released: bool = False) -> dict[str, torch.Tensor]:
    raw = load_released_features(folder, space) if released else load_features(
        folder, expect_name=space)
    out = {}
    for key, arr in raw.items():
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        bad = (~torch.isfinite(t)).any(1).nonzero().flatten()
        if len(bad):
            from attribution.features.cache import RELEASED_FILES

            path = (Path(folder) / space / RELEASED_FILES[key] if released
                    else Path(folder) / f"{key}.npy")
            raise FloatingPointError(f"{space} features have non-finite rows "
                                     f"{bad[:5].tolist()} in {path}")
        out[key] = t
    return out


def _logger(cfg, out: Path):
    kind = cfg.student.logger
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=out, name="logs")
    import os

    from lightning.pytorch.loggers import WandbLogger

    # Under `wandb agent` (WANDB_SWEEP_ID set) the run must report online to its sweep.
    offline = kind == "wandb_offline" and "WANDB_SWEEP_ID" not in os.environ
    return WandbLogger(save_dir=str(out), offline=offline, log_model=False,
                       project="fast-attribution", group=f"student-{cfg.student.loss}",
                       name=f"{cfg.name}-{cfg.student.feature}", config=to_dict(cfg))


def train_student(cfg, features_dir: Path, teacher_dir: Path, out: Path,
                  progress: bool = True, released: bool = False) -> dict:
    """Train the head on the teacher's rankings; evaluate mAP@k on the held-out test queries
    (whole training set ranked) against the untuned features; save head, index and metrics.

    ``released``: ``features_dir`` is a released ``feats/`` folder (``<space>/data_feats.npy``
    ...) instead of this project's feature cache."""
    sc = cfg.student
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feats = _checked_features(features_dir if released else space_dir(features_dir, sc.feature),
                              sc.feature, released)
    n_items = feats["items"].shape[0]
    ranks = load_rankings(teacher_dir, n_items)
    for split, r in (("train", ranks.train), ("test", ranks.test)):
        if feats[f"query_{split}"].shape[0] != r.shape[0]:
            raise DataFileError(f"{sc.feature} features have {feats[f'query_{split}'].shape[0]} "
                                f"{split} queries but the teacher ranked {r.shape[0]}")
    q, m = select_queries(ranks.train.shape[0], sc.n_queries, sc.m, sc.budget,
                          ranks.train.shape[1])
    seed = cfg.seed if sc.seed is None else sc.seed
    L.seed_everything(seed, workers=True, verbose=False)
    dm = PairDataModule(ranks.train[:q], n_items, sc.queries_per_batch, sc.pairs_per_query,
                        sc.p_outside, m, seed, sc.num_workers)
    head = EmbeddingHead([feats["items"].shape[1], *sc.hidden], sc.dropout, sc.layernorm,
                         sc.alpha_init)
    loss = build_loss(sc.loss, n_bins=sc.ordinal_bins,
                      target_temperature=sc.listwise_temperature)
    module = StudentModule(head, loss, feats["items"], feats["query_train"][:q], sc.lr,
                           sc.weight_decay)
    ks = [k for k in sc.k_eval if k <= n_items]
    mapcb = RankingMAPCallback(feats["items"], feats["query_test"], ranks.test, ks)
    thr = ThroughputCallback(feats["items"], feats["query_test"])
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best",
                           monitor=f"val/mAP@{ks[0]}", mode="max", save_last=True,
                           auto_insert_metric_name=False, enable_version_counter=False)
    trainer = L.Trainer(max_epochs=sc.epochs, accelerator=accelerator_for(cfg.device),
                        devices=sc.devices, num_nodes=sc.num_nodes, strategy=sc.strategy,
                        use_distributed_sampler=False,  # PairDataModule shards global batches
                        logger=_logger(cfg, out), callbacks=[mapcb, thr, ckpt],
                        enable_progress_bar=progress, enable_model_summary=False,
                        log_every_n_steps=5, num_sanity_val_steps=0)
    start = time.time()
    trainer.fit(module, datamodule=dm)
    seconds = time.time() - start
    if sc.devices * sc.num_nodes > 1:
        # with ddp_spawn only the weights come back to this process (not callback state), and
        # with ddp every rank runs on from here: measure in the process we are in
        module.to("cpu")
        mapcb.on_fit_start(trainer, module)  # the untuned baseline
        mapcb.last = mapcb.evaluate(module)
        thr.on_fit_end(trainer, module)
        if trainer.global_rank != 0:  # a ddp worker (torchrun / SLURM): rank 0 carries on
            sys.exit(0)
    # Reported figures are the LAST epoch's (no selection on the test queries); best.ckpt is
    # kept for users who validate elsewhere.
    torch.save(head.state_dict(), out / "head.pt")
    (out / "head.json").write_text(json.dumps({"dims": [head.in_dim, *sc.hidden],
                                               "dropout": sc.dropout, "layernorm": sc.layernorm,
                                               "feature": sc.feature}))
    item_emb = module.embed(feats["items"]).numpy()
    retrieval.save_index(retrieval.build_index(item_emb, sc.index), out / "index.faiss")
    if sc.index != "flat":  # what an approximate index re-ranks with at query time
        retrieval.save_rerank_vectors(item_emb, out / "index.vectors.npy")
    metrics = {"feature": sc.feature, "loss": sc.loss, "train_queries": q,
               "kept_per_query": m or ranks.train.shape[1], "seconds": seconds,
               "alpha": float(head.alpha.detach()), "beta": float(head.beta.detach())}
    metrics.update({f"student.{k}": v for k, v in mapcb.last.items()})
    metrics.update({f"baseline.{sc.feature}.{k}": v for k, v in mapcb.baseline.items()})
    metrics.update({f"student.{k}": v for k, v in thr.results.items()})
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    if trainer.logger:  # the flat names the sweep files optimize (student.mAP@k, ...)
        trainer.logger.log_metrics({k: v for k, v in metrics.items()
                                    if isinstance(v, float | int) and not isinstance(v, bool)})
    return metrics
