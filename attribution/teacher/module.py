"""TeacherModule: Lightning's predict loop scores queries, so devices and nodes split them.

Each finished query is written as its own shard by :class:`ShardWriter` (atomic, never
overwritten); a rerun skips finished queries.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from attribution.teacher.scorer import AbUScorer, Query
from attribution.teacher.shards import ShardStore


class QueryDataset(Dataset):
    """The queries still to score (finished ones are left out by the caller)."""

    def __init__(self, queries: list[Query]):
        self.queries = queries

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> Query:
        return self.queries[i]


def collate_one(batch: list[Query]) -> Query:
    if len(batch) != 1:
        raise ValueError("the teacher scores one query per step (batch_size=1)")
    return batch[0]


class TeacherModule(L.LightningModule):
    """Wraps an :class:`AbUScorer`; ``predict_step`` returns one query's influence.

    ``base_losses(scorer, rank, world_size, barrier)``, when the scorer has no L_j(θ0) yet, computes
    them once the model is on its device and the ranks exist (each rank a share)."""

    def __init__(self, scorer: AbUScorer, base_losses=None):
        super().__init__()
        self.scorer, self.base_losses = scorer, base_losses
        self.unet = scorer.unet  # registered so Lightning moves it to the device

    def on_predict_start(self) -> None:
        if self.scorer.base is None:
            if self.base_losses is None:
                raise ValueError("the scorer has no base losses and no way to compute them")
            self.scorer.base = self.base_losses(self.scorer, self.global_rank,
                                                self.trainer.world_size,
                                                self.trainer.strategy.barrier)

    def predict_step(self, query: Query, batch_idx: int) -> dict:
        with torch.enable_grad():
            return self.scorer.score(query)


class ShardWriter(BasePredictionWriter):
    """Writes each query's result as a shard as soon as it is done; shows queries done/left."""

    def __init__(self, store: ShardStore, total: int, already: int, progress: bool = True):
        super().__init__(write_interval="batch")
        self.store, self.total, self.already, self.progress = store, total, already, progress
        self.bar = None
        self.start = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self.start = time.time()
        self.bar = tqdm(total=self.total, initial=self.already, desc="teacher queries",
                        disable=not self.progress or trainer.global_rank != 0, unit="query")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx=0) -> None:
        q: Query = batch
        info = {k: float(prediction[k]) for k in ("query_loss_before", "query_loss_after",
                                                  "seconds")}
        info["rank"] = int(trainer.global_rank)  # which process scored it (sharding audit)
        self.store.write(q.split, q.query_id, q.candidates.numpy(),
                         prediction["influence"].numpy(), info)
        self.bar.update(1)
        self.bar.set_postfix(s_per_query=f"{prediction['seconds']:.1f}",
                             loss_up=f"{info['query_loss_after'] - info['query_loss_before']:.2e}")

    def on_predict_end(self, trainer, pl_module) -> None:
        self.bar.close()
