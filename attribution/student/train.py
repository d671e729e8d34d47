"""Student entry point: ``train_student(cfg, features_dir, teacher_dir, out) -> metrics``."""

from __future__ import annotations

import functools
import json
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
from attribution.common.devices import accelerator_for, faiss_on_gpu
from attribution.common.files import DataFileError, atomic_write_bytes
from attribution.common.seeds import seeded_generator
from attribution.config import (
    ConfigError,
    to_dict,
    val_concept_rows,
    val_count,
    validation_k,
)
from attribution.data.released import RELEASED_FILES, load_released_features
from attribution.features.cache import load_features, space_dir
from attribution.student.data import PairDataModule, load_rankings, select_queries
from attribution.student.head import EmbeddingHead, head_dims, query_metric, whitening
from attribution.student.losses import build_loss
from attribution.student.module import StudentModule


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
    # W&B's own scratch (debug logs, cache, settings) under the run's folder, not in ~/.cache
    # and ~/.config, unless the user chose where; beside the stage's folder, not in it (its
    # debug logs may grow after the stage's files are recorded)
    scratch = out.parent / ".wandb"
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data")):
        os.environ.setdefault(var, str(scratch / sub))
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


def _load_inputs(cfg, features_dir: Path, teacher_dir: Path, released: bool):
    """(features, rankings) of the student's space, checked against each other."""
    sc = cfg.student
    feats = _checked_features(features_dir if released else space_dir(features_dir, sc.feature),
                              sc.feature, released)
    ranks = load_rankings(teacher_dir, feats["items"].shape[0])
    for split, r in (("train", ranks.train), ("test", ranks.test)):
        if feats[f"query_{split}"].shape[0] != r.shape[0]:
            raise DataFileError(f"{sc.feature} features have {feats[f'query_{split}'].shape[0]} "
                                f"{split} queries but the teacher ranked {r.shape[0]}")
    return feats, ranks


def _build_module(sc, feats: dict, train_rows: np.ndarray) -> StudentModule:
    """The head (whitened on the training items' features when asked), its loss and anchor."""
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
    return StudentModule(head, loss, feats["items"], feats["query_train"][train_rows], sc.lr,
                         sc.weight_decay, sc.anchor, metric)


def _trainer(cfg, out: Path, callbacks: list, progress: bool) -> L.Trainer:
    sc = cfg.student
    return L.Trainer(max_epochs=sc.epochs, accelerator=accelerator_for(cfg.device),
                     devices=sc.devices, num_nodes=sc.num_nodes, strategy=sc.strategy,
                     use_distributed_sampler=False,  # PairDataModule shards global batches
                     max_time=timedelta(minutes=sc.max_minutes) if sc.max_minutes else None,
                     logger=_logger(cfg, out), callbacks=callbacks,
                     enable_progress_bar=progress, enable_model_summary=False,
                     log_every_n_steps=5, num_sanity_val_steps=0)


def _validation_metrics(sc, valcb: ValidationCallback, module: StudentModule, k_val: int,
                        planted: np.ndarray) -> dict:
    """The chosen head's validation figures (overall, and on the validation concepts'
    queries and the rest apart when ``planted`` marks some), beside the untuned features'."""
    chosen = ((valcb.best, valcb.best_se) if sc.select == "best"
              and valcb.best_state is not None else valcb.last)
    out = {"student.val_k": k_val,  # the k of student.val_mAP (any K: sweeps use it)
           "student.val_mAP": chosen[0], "student.val_mAP_stderr": chosen[1],
           f"student.val_mAP@{k_val}": chosen[0], f"student.val_mAP@{k_val}_stderr": chosen[1],
           f"baseline.{sc.feature}.val_mAP@{k_val}": valcb.baseline[0],
           "val_history": valcb.history}
    if planted.any():
        for name, mask in (("planted", planted), ("ordinary", ~planted)):
            if mask.any():
                mean, se = valcb.evaluate(module.embed, mask)
                out[f"student.val_{name}.mAP@{k_val}"] = mean
                out[f"student.val_{name}.mAP@{k_val}_stderr"] = se
                out[f"baseline.{sc.feature}.val_{name}.mAP@{k_val}"] = valcb.evaluate(
                    lambda x: F.normalize(x, dim=-1), mask)[0]
    return out


def _test_metrics(sc, module: StudentModule, feats: dict, test_rank: np.ndarray) -> dict:
    """The test queries, read here once with the chosen head: the student's mAP@k and its
    untuned features' (``baseline.<feature>.mAP@k``)."""
    ks = [k for k in sc.k_eval if k <= feats["items"].shape[0]]
    test = evaluate_test(module.embed, feats, test_rank, ks)
    base = evaluate_test(lambda x: F.normalize(torch.as_tensor(np.asarray(x)), dim=-1), feats,
                         test_rank, ks)
    return {**{f"student.{k}": v for k, v in test.items()},
            **{f"baseline.{sc.feature}.{k}": v for k, v in base.items()}}


def _whitened_baseline(sc, module: StudentModule, feats: dict, test_rank: np.ndarray,
                       out: Path) -> dict:
    """The head's start, untrained: the input features whitened as the head whitens them,
    ranked by cosine (``baseline.whitened.mAP@k``); its test ranking is kept
    (``rank_whitened.npy``) for the per-kind figures.  Nothing without whitening."""
    if not module.head.whiten:
        return {}
    center, whitener = module.head.center.cpu(), module.head.whitener.cpu()

    def white(x):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return F.normalize((x - center) @ whitener, dim=-1)

    rank = rank_all(white(feats["query_test"]), white(feats["items"]))
    np.save(out / "rank_whitened.npy", rank.astype(np.int32))
    ks = [k for k in sc.k_eval if k <= feats["items"].shape[0]]
    return {f"baseline.whitened.{k}": v for k, v in map_at_ks(rank, test_rank, ks).items()}


def _save_deployment(sc, module: StudentModule, feats: dict, out: Path, gpu: bool) -> None:
    """head.pt + head.json (what `attribute` rebuilds it from) and the faiss index."""
    head = module.head
    torch.save(head.state_dict(), out / "head.pt")
    (out / "head.json").write_text(json.dumps({"kind": sc.head, "dims": head_dims(
        sc.head, head.in_dim, list(sc.hidden)), "dropout": sc.dropout, "layernorm": sc.layernorm,
        "feature": sc.feature, "whiten": sc.whiten}))
    item_emb = module.embed(feats["items"]).numpy()
    retrieval.save_index(retrieval.build_index(item_emb, sc.index, gpu=gpu), out / "index.faiss")
    if sc.index != "flat":  # what an approximate index re-ranks with at query time
        retrieval.save_rerank_vectors(item_emb, out / "index.vectors.npy")


def _after_parallel_fit(trainer, module, valcb, thr, epochs_run: int) -> None:
    """With ddp_spawn only the weights come back to this process (not callback state), and
    with ddp every rank runs on from here: measure in the process we are in."""
    module.to("cpu")
    if valcb is not None and valcb.best_state is None:  # spawn: the last epoch's weights
        valcb.baseline = valcb.evaluate(lambda x: F.normalize(x, dim=-1))
        valcb.consider(module, epochs_run)
    thr.on_fit_end(trainer, module)
    if trainer.global_rank != 0:  # a ddp worker (torchrun / SLURM): rank 0 carries on
        sys.exit(0)


def train_student(cfg, features_dir: Path, teacher_dir: Path, out: Path,
                  progress: bool = True, released: bool = False, gallery=None) -> dict:
    """Train the head on the teacher's rankings of training queries; choose the epoch on
    held-out training queries (validation); then evaluate mAP@k ONCE on the test queries (whole
    training set ranked) against the untuned features; save head, index and metrics.

    ``released``: ``features_dir`` is a released ``feats/`` folder (``<space>/data_feats.npy``
    ...) instead of this project's feature cache.  ``gallery``: called with (the logger, the
    chosen head's embed, the test rankings) to log what the student retrieves."""
    sc, out = cfg.student, Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feats, ranks = _load_inputs(cfg, features_dir, teacher_dir, released)
    n_items, n_candidates = feats["items"].shape[0], ranks.train.shape[1]
    held = val_concept_rows(cfg)
    val_rows, train_rows = split_validation(ranks.train.shape[0], sc.val_queries, cfg.seed, held)
    q, m = select_queries(len(train_rows), sc.n_queries, sc.m, sc.budget, n_candidates)
    train_rows = train_rows[:q]
    seed = cfg.seed if sc.seed is None else sc.seed
    L.seed_everything(seed, workers=True, verbose=False)
    dm = PairDataModule(ranks.train[train_rows], n_items, sc.queries_per_batch,
                        sc.pairs_per_query, sc.p_outside, m, seed, sc.num_workers)
    module = _build_module(sc, feats, train_rows)
    try:
        k_val = validation_k(sc.k_val, sc.k_eval, n_candidates)
    except ConfigError as err:  # released data: K is the rankings' width, known only here
        raise DataFileError(str(err)) from None
    valcb = ValidationCallback(feats["items"], feats["query_train"][val_rows],
                               ranks.train[val_rows], k_val, sc.patience, sc.val_scope,
                               sc.val_outside, cfg.seed) if len(val_rows) else None
    gpu_index = faiss_on_gpu(cfg.device)  # an error now, not after training, if it cannot
    thr = ThroughputCallback(feats["items"], feats["query_test"], gpu=gpu_index)
    trainer = _trainer(cfg, out, [*([valcb] if valcb else []), thr,
                                  _checkpoint(out, k_val if valcb else None)], progress)
    start = time.time()
    trainer.fit(module, datamodule=dm)
    seconds, epochs_run = time.time() - start, int(trainer.current_epoch)
    if sc.devices * sc.num_nodes > 1:
        _after_parallel_fit(trainer, module, valcb, thr, epochs_run)
    selected = epochs_run
    if sc.select == "best" and valcb is not None and valcb.best_state is not None:
        module.head.load_state_dict(valcb.best_state)
        selected = int(valcb.best_epoch)
    module.to("cpu")
    _save_deployment(sc, module, feats, out, gpu_index)
    metrics = {"feature": sc.feature, "loss": sc.loss, "head": sc.head, "train_queries": q,
               "val_queries": int(len(val_rows)), "val_scope": sc.val_scope,
               "kept_per_query": m or n_candidates, "seconds": seconds,
               "epochs_run": epochs_run, "selected_epoch": selected,
               "alpha": float(module.head.alpha.detach()),
               "beta": float(module.head.beta.detach()), **thr.results_as("student.")}
    if valcb is not None:
        metrics.update(_validation_metrics(sc, valcb, module, k_val, np.isin(val_rows, held)))
    metrics.update(_test_metrics(sc, module, feats, ranks.test))
    metrics.update(_whitened_baseline(sc, module, feats, ranks.test, out))
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    if trainer.logger:
        _log_run(trainer.logger, metrics,
                 gallery and functools.partial(gallery, embed=module.embed, feats=feats,
                                               test_rank=ranks.test))
    return metrics


def _checkpoint(out: Path, k_val: int | None) -> ModelCheckpoint:
    """``best`` (by validation mAP@k_val when there is validation) and ``last``."""
    return ModelCheckpoint(dirpath=out / "checkpoints", filename="best",
                           monitor=f"val/mAP@{k_val}" if k_val is not None else None,
                           mode="max", save_last=True, auto_insert_metric_name=False,
                           enable_version_counter=False)


def _log_run(logger, metrics: dict, gallery) -> None:
    """Log the flat names the sweep files optimize (student.val_mAP, ...) and the gallery,
    then end a W&B run: Lightning's WandbLogger reuses a run still open in the process, so a
    second student trained in the same process would log into the first's."""
    from lightning.pytorch.loggers import WandbLogger

    logger.log_metrics({k: v for k, v in metrics.items()
                        if isinstance(v, float | int) and not isinstance(v, bool)})
    if gallery:
        gallery(logger)
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()
