"""Student entry point: ``train_student(cfg, features_dir, teacher_dir, out) -> metrics``."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from attribution import retrieval
from attribution.callbacks import ThroughputCallback, ValidationCallback, map_at_ks, rank_all
from attribution.common.devices import accelerator_for
from attribution.common.files import DataFileError, atomic_write_bytes
from attribution.common.seeds import seeded_generator
from attribution.config import to_dict, val_concept_rows, val_count
from attribution.data.released import RELEASED_FILES, load_released_features
from attribution.features.cache import load_features, space_dir
from attribution.student.data import PairDataModule, load_rankings, select_queries
from attribution.student.head import EmbeddingHead, head_dims, query_metric, whitening
from attribution.student.losses import build_loss
from attribution.student.module import StudentModule

log = logging.getLogger(__name__)


def _checked_features(folder: Path, space: str, released: bool = False) -> dict[str, torch.Tensor]:
    raw = load_released_features(folder, space) if released else load_features(
        folder, expect_name=space)
    out = {}
    for key, arr in raw.items():
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        bad = (~torch.isfinite(t)).any(1).nonzero().flatten()
        if len(bad):

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


def split_validation(n_queries: int, val_queries: float, seed: int,
                     held: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows) of the ``n_queries`` teacher-ranked training queries.

    ``held``: rows that are never trained on whatever ``val_queries`` says (the queries that
    prompt a validation concept); they are validation rows, and the rest of the validation set
    is drawn at random from the other rows.  The random rows are drawn with the RUN's seed (not
    the student's, so student seeds vary only the training); the training rows keep their
    original order, so ``student.n_queries=Q`` (data scaling) takes the first Q of them and
    every Q shares one validation set.  With ``val_queries=0`` there is no validation and the
    held rows are dropped."""
    held_rows = np.array(sorted(set(held or [])), dtype=np.int64)
    if len(held_rows) and (held_rows.min() < 0 or held_rows.max() >= n_queries):
        raise DataFileError(f"validation-concept rows {held_rows.tolist()[:5]}... lie outside "
                            f"the {n_queries} ranked training queries")
    n_val = val_count(n_queries, val_queries)
    n_out = max(n_val, len(held_rows))  # held rows are out of training either way
    if n_out >= n_queries:
        raise DataFileError(f"student.val_queries={val_queries} holds out {n_out} of the "
                            f"{n_queries} ranked training queries: none left to train on")
    perm = torch.randperm(n_queries, generator=seeded_generator(seed, 79)).numpy()
    perm = perm[~np.isin(perm, held_rows)]
    val = np.sort(np.concatenate([held_rows, perm[:max(0, n_val - len(held_rows))]]))
    train = np.setdiff1d(np.arange(n_queries), val)
    return (val if n_val else val[:0]), train


def evaluate_test(embed, feats: dict, test_rank: np.ndarray, ks: list[int]) -> dict:
    """mAP@k (+ s.e.) on the test queries, whole training set ranked: read once, after
    training, for the reported figures."""
    return map_at_ks(rank_all(embed(feats["query_test"]), embed(feats["items"])), test_rank, ks)


def train_student(cfg, features_dir: Path, teacher_dir: Path, out: Path,
                  progress: bool = True, released: bool = False) -> dict:
    """Train the head on the teacher's rankings of training queries; choose the epoch on
    held-out training queries (validation); then evaluate mAP@k ONCE on the test queries (whole
    training set ranked) against the untuned features; save head, index and metrics.

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
    held = val_concept_rows(cfg)
    val_rows, train_rows = split_validation(ranks.train.shape[0], sc.val_queries, cfg.seed, held)
    q, m = select_queries(len(train_rows), sc.n_queries, sc.m, sc.budget,
                          ranks.train.shape[1])
    train_rows = train_rows[:q]
    seed = cfg.seed if sc.seed is None else sc.seed
    L.seed_everything(seed, workers=True, verbose=False)
    dm = PairDataModule(ranks.train[train_rows], n_items, sc.queries_per_batch,
                        sc.pairs_per_query, sc.p_outside, m, seed, sc.num_workers)
    head = EmbeddingHead(head_dims(sc.head, feats["items"].shape[1], list(sc.hidden)),
                         sc.dropout, sc.layernorm, sc.alpha_init, sc.head, whiten=sc.whiten > 0)
    if sc.whiten > 0:  # fit on the training items' features only: no labels, no queries
        head.set_whitening(*whitening(feats["items"], sc.whiten))
    loss = build_loss(sc.loss, n_bins=sc.ordinal_bins,
                      target_temperature=sc.listwise_temperature)
    metric = None
    if sc.anchor_basis == "queries":  # (the config check asks for anchor > 0 with it)
        metric = query_metric(feats["query_train"][train_rows],
                              *((head.center, head.whitener) if head.whiten else ()))
    module = StudentModule(head, loss, feats["items"], feats["query_train"][train_rows], sc.lr,
                           sc.weight_decay, sc.anchor, metric)
    ks = [k for k in sc.k_eval if k <= n_items]
    k_val = sc.k_val
    if k_val >= ranks.train.shape[1] and sc.val_scope == "kset":  # every candidate a
        # positive: AP within the K-set would be 1 always (ranked among all N it is not)
        k_val = max(1, ranks.train.shape[1] // 10)
        log.warning("student.k_val=%d is not below the %d ranked candidates per training "
                    "query; validating at mAP@%d instead", sc.k_val, ranks.train.shape[1],
                    k_val)
    callbacks: list = []
    valcb = None
    if len(val_rows):
        valcb = ValidationCallback(feats["items"], feats["query_train"][val_rows],
                                   ranks.train[val_rows], k_val, sc.patience, sc.val_scope)
        callbacks.append(valcb)
    thr = ThroughputCallback(feats["items"], feats["query_test"])
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best",
                           monitor=f"val/mAP@{k_val}" if valcb else None, mode="max",
                           save_last=True, auto_insert_metric_name=False,
                           enable_version_counter=False)
    trainer = L.Trainer(max_epochs=sc.epochs, accelerator=accelerator_for(cfg.device),
                        devices=sc.devices, num_nodes=sc.num_nodes, strategy=sc.strategy,
                        use_distributed_sampler=False,  # PairDataModule shards global batches
                        max_time=timedelta(minutes=sc.max_minutes) if sc.max_minutes else None,
                        logger=_logger(cfg, out), callbacks=[*callbacks, thr, ckpt],
                        enable_progress_bar=progress, enable_model_summary=False,
                        log_every_n_steps=5, num_sanity_val_steps=0)
    start = time.time()
    trainer.fit(module, datamodule=dm)
    seconds = time.time() - start
    epochs_run = int(trainer.current_epoch)
    if sc.devices * sc.num_nodes > 1:
        # with ddp_spawn only the weights come back to this process (not callback state), and
        # with ddp every rank runs on from here: measure in the process we are in
        module.to("cpu")
        if valcb is not None and valcb.best_state is None:  # spawn: the last epoch's weights
            valcb.baseline = valcb.evaluate(lambda x: F.normalize(x, dim=-1))
            valcb.consider(module, epochs_run)
        thr.on_fit_end(trainer, module)
        if trainer.global_rank != 0:  # a ddp worker (torchrun / SLURM): rank 0 carries on
            sys.exit(0)
    selected = epochs_run
    if valcb is not None and valcb.best_state is not None:  # the best validation epoch
        head.load_state_dict(valcb.best_state)
        selected = int(valcb.best_epoch)
    module.to("cpu")
    # the test queries are read here, once, with the chosen head
    test = evaluate_test(module.embed, feats, ranks.test, ks)
    baseline = evaluate_test(lambda x: F.normalize(torch.as_tensor(np.asarray(x)), dim=-1),
                             feats, ranks.test, ks)
    torch.save(head.state_dict(), out / "head.pt")
    (out / "head.json").write_text(json.dumps({"kind": sc.head, "dims": head_dims(
        sc.head, head.in_dim, list(sc.hidden)), "dropout": sc.dropout, "layernorm": sc.layernorm,
        "feature": sc.feature, "whiten": sc.whiten}))
    item_emb = module.embed(feats["items"]).numpy()
    retrieval.save_index(retrieval.build_index(item_emb, sc.index), out / "index.faiss")
    if sc.index != "flat":  # what an approximate index re-ranks with at query time
        retrieval.save_rerank_vectors(item_emb, out / "index.vectors.npy")
    metrics = {"feature": sc.feature, "loss": sc.loss, "head": sc.head, "train_queries": q,
               "val_queries": int(len(val_rows)), "val_scope": sc.val_scope,
               "kept_per_query": m or ranks.train.shape[1], "seconds": seconds,
               "epochs_run": epochs_run, "selected_epoch": selected,
               "alpha": float(head.alpha.detach()), "beta": float(head.beta.detach())}
    if valcb is not None:
        chosen = (valcb.best, valcb.best_se) if valcb.best_state is not None else valcb.last
        metrics[f"student.val_mAP@{k_val}"] = chosen[0]
        metrics[f"student.val_mAP@{k_val}_stderr"] = chosen[1]
        metrics[f"baseline.{sc.feature}.val_mAP@{k_val}"] = valcb.baseline[0]
        metrics["val_history"] = valcb.history
        planted = np.isin(val_rows, held)
        if planted.any():  # the chosen head on the validation concepts' queries and the rest
            for name, mask in (("planted", planted), ("ordinary", ~planted)):
                if mask.any():
                    mean, se = valcb.evaluate(module.embed, mask)
                    metrics[f"student.val_{name}.mAP@{k_val}"] = mean
                    metrics[f"student.val_{name}.mAP@{k_val}_stderr"] = se
                    metrics[f"baseline.{sc.feature}.val_{name}.mAP@{k_val}"] = valcb.evaluate(
                        lambda x: F.normalize(x, dim=-1), mask)[0]
    metrics.update({f"student.{k}": v for k, v in test.items()})
    metrics.update({f"baseline.{sc.feature}.{k}": v for k, v in baseline.items()})
    metrics.update({f"student.{k}": v for k, v in thr.results.items()})
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    if trainer.logger:  # the flat names the sweep files optimize (student.val_mAP@k, ...)
        trainer.logger.log_metrics({k: v for k, v in metrics.items()
                                    if isinstance(v, float | int) and not isinstance(v, bool)})
    return metrics
