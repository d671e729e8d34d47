"""StudentModule: trains the embedding head on teacher-ranked pairs."""

from __future__ import annotations

import lightning as L
import torch

from attribution.student.head import EmbeddingHead
from attribution.student.losses import RankingLoss


class StudentModule(L.LightningModule):
    """Head + loss; features are looked up by id (kept out of checkpoints: they are a cache).

    Args:
        item_feats: float (N, D) training-item features; query_feats: float (Q, D) training
            query features (rows match the teacher rankings' rows).
        anchor: λ of the pull λ·Σ‖θ − θ₀‖² / Σ‖θ₀‖² of the embedding map's weights toward
            where they started (L2-SP; a linear or residual head starts at the identity, so
            this keeps the directions the training queries never use as the untuned features
            had them).  The squared distance is relative to the start's own ‖θ₀‖² (D for a D-d
            identity), so λ is a pull on the map's relative change whatever its width.
        anchor_metric: (D_in, D_in) P (:func:`~attribution.student.head.query_metric`): the
            first layer's weight is pulled by tr(ΔPΔᵀ) instead of ‖Δ‖² — fully along the
            input directions the training queries do not carry, less along those they do;
            the other weights keep the plain pull.  None: the plain pull everywhere.
    """

    def __init__(self, head: EmbeddingHead, loss: RankingLoss, item_feats: torch.Tensor,
                 query_feats: torch.Tensor, lr: float = 1e-3, weight_decay: float = 0.0,
                 anchor: float = 0.0, anchor_metric: torch.Tensor | None = None):
        super().__init__()
        if anchor < 0:
            raise ValueError(f"anchor must be >= 0, got {anchor}")
        self.save_hyperparameters(ignore=["head", "loss", "item_feats", "query_feats",
                                          "anchor_metric"])
        self.head, self.loss_fn = head, loss
        self.item_feats, self.query_feats = item_feats, query_feats
        self._start = []  # the starting weights: buffers (they follow .to()), not checkpointed
        # index (in head.net.parameters()) of the first layer's weight, where the metric
        # applies; an index, not the tensor: a Parameter set as an attribute would be registered
        # a second time (and written into checkpoints) under that name
        self._first = None
        if anchor_metric is not None:
            if anchor <= 0:
                raise ValueError("an anchor metric needs anchor > 0 (there is no pull to shape)")
            weights = [(i, p) for i, p in enumerate(head.net.parameters()) if p.ndim == 2]
            if not weights or weights[0][1].shape[1] != anchor_metric.shape[0] \
                    or anchor_metric.shape[0] != anchor_metric.shape[1]:
                raise ValueError(f"anchor metric of shape {tuple(anchor_metric.shape)} does not "
                                 f"fit the head's first layer "
                                 f"{tuple(weights[0][1].shape) if weights else None}")
            self._first = weights[0][0]
            self.register_buffer("_anchor_metric", anchor_metric.detach().clone(),
                                 persistent=False)
        if anchor > 0:
            for i, p in enumerate(head.net.parameters()):
                self.register_buffer(f"_start_{i}", p.detach().clone(), persistent=False)
                self._start.append(f"_start_{i}")
            scale = sum(float(p.detach().double().pow(2).sum()) for p in head.net.parameters())
            if not scale > 0:
                raise ValueError("the anchor is relative to the head's starting weights, which "
                                 "are all zero")
            self._start_scale = scale

    def anchor_penalty(self) -> torch.Tensor:
        """Σ‖θ − θ₀‖² / Σ‖θ₀‖² over the embedding map's weights, the first layer's weight
        measured by the anchor metric when there is one (0 without an anchor)."""
        total = torch.zeros((), device=self.device)
        for i, (p, name) in enumerate(zip(self.head.net.parameters(), self._start, strict=False)):
            delta = p - getattr(self, name)
            if i == self._first:
                total = total + ((delta @ self._anchor_metric) * delta).sum()
            else:
                total = total + delta.pow(2).sum()
        return total / self._start_scale if self._start else total

    def scores(self, batch: dict) -> torch.Tensor:
        """Pair scores (B, P); each distinct query and item is embedded once."""
        items = batch["items"]
        uniq, inv = torch.unique(items, return_inverse=True)
        ex = self.head.embed(self.item_feats[uniq.cpu()].to(self.device))[inv]
        eq = self.head.embed(self.query_feats[batch["query"].cpu()].to(self.device))
        return self.head.score(eq, ex)

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        parts = self.loss_fn(self.scores(batch), batch["target"])
        if not torch.isfinite(parts["loss"]):
            raise FloatingPointError(f"non-finite {stage} loss at step {self.global_step}")
        bs = batch["items"].numel()
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", batch_size=bs)
        self.log(f"{stage}/alpha", self.head.alpha.detach(), batch_size=bs)
        return parts["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.shared_step(batch, "train")
        if self._start:
            pull = self.hparams.anchor * self.anchor_penalty()
            self.log("train/anchor", pull.detach(), batch_size=batch["items"].numel())
            loss = loss + pull
        return loss

    @torch.no_grad()
    def embed(self, feats: torch.Tensor | object, batch_size: int = 4096) -> torch.Tensor:
        """L2-normalized embeddings of raw features (any row count), on the CPU."""
        was = self.training
        self.eval()
        out = []
        for s in range(0, len(feats), batch_size):
            x = torch.as_tensor(feats[s : s + batch_size], dtype=torch.float32)
            out.append(self.head.embed(x.to(self.device)).cpu())
        self.train(was)
        return torch.cat(out)

    def configure_optimizers(self):
        params = [p for p in self.head.parameters()
                  if not (self.loss_fn.shift_invariant and p is self.head.beta)]
        return torch.optim.AdamW(params + list(self.loss_fn.parameters()),
                                 lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
