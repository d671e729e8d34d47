"""LightningModule and data plumbing that train the text-to-image generator.

Determinism: every random draw of a training step — which items, caption choice, timestep, noise,
CFG drop — comes from a generator seeded by (seed, global_step) alone.  Lightning's epoch and
batch bookkeeping on resume therefore cannot change the data a step sees, and a run resumed from
``last.ckpt`` equals an uninterrupted one (tested).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
from torch.utils.data import Dataset

from attribution.common.seeds import seeded_generator
from attribution.data.text_cache import TextTable
from attribution.generator.model import denoising_loss


class StepDataset(Dataset):
    """``n`` placeholder items: the loader only paces the steps; data is drawn per global step."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class GeneratorModule(L.LightningModule):
    """Trains a conditional UNet with the ε-prediction loss and CFG caption dropout.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (built outside; this module knows no config).
        text_table: token states of every caption (kept out of checkpoints: it is a cache).
        latents: float (N, C, h, w) model-space training items, or (N, V, C, h, w) with V stored
            views per item (a pre-encoded world's image and mirror), one drawn per sample
            (kept out of checkpoints).
        alphas_cumprod: (T,) the DDPM schedule's ᾱ_t.
        exclude: item ids left out (leave-K-out retraining).  Each step still draws its batch
            from all N items exactly as the full run does and then drops the excluded draws, the
            loss keeping the full batch's denominator: the gradient of every step is the full
            run's minus the excluded items' terms.  Sharing every other random number with the
            full run (common random numbers) is what makes a leave-10-out difference measurable
            above the noise of a retraining (redrawing batches from the remaining items would
            change every batch).
    """

    def __init__(self, unet, text_table: TextTable, latents: torch.Tensor,
                 alphas_cumprod: torch.Tensor, batch_size: int = 64, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 50, cfg_dropout: float = 0.1,
                 ema_decay: float = 0.999, seed: int = 0, lr_schedule: str = "constant",
                 total_steps: int = 0, exclude: torch.Tensor | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["unet", "text_table", "latents", "alphas_cumprod",
                                          "exclude"])
        self.excluded = None  # bool (N,) or None
        if exclude is not None and len(exclude):
            self.excluded = torch.zeros(len(latents), dtype=torch.bool)
            self.excluded[torch.as_tensor(exclude, dtype=torch.long)] = True
        if latents.shape[0] != text_table.rows.shape[0]:
            raise ValueError(f"{latents.shape[0]} items but {text_table.rows.shape[0]} caption rows")
        self.unet = unet
        self.ema = copy.deepcopy(unet).requires_grad_(False) if ema_decay > 0 else None
        self.text_table, self.latents = text_table, latents
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def sampling_unet(self):
        """The weights to sample with and to release: EMA when enabled."""
        return self.ema if self.ema is not None else self.unet

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        g = seeded_generator(self.hparams.seed, 7, self.global_step)
        b = self.hparams.batch_size
        idx = torch.randint(len(self.latents), (b,), generator=g)
        rows = self.text_table.rows[idx]
        n_caps = rows.shape[1]
        pick = torch.randint(n_caps, (b,), generator=g)
        t = torch.randint(len(self.alphas_cumprod), (b,), generator=g)
        noise = torch.randn((b, *self.latents.shape[-3:]), generator=g)
        drop = torch.rand(b, generator=g) < self.hparams.cfg_dropout
        if self.latents.dim() == 5:  # stored views: drawn last, so 4-d worlds keep their draws
            z = self.latents[idx, torch.randint(self.latents.shape[1], (b,), generator=g)]
        else:
            z = self.latents[idx]
        z = z.to(self.device)
        row = rows[torch.arange(b), pick].masked_fill(drop, 0)
        cond = self.text_table.lookup(row).to(z.device)
        scale = 1.0
        rank, ranks = self._world()
        if self.excluded is not None:  # drop the excluded draws, keep every other random number
            kept = torch.nonzero(~self.excluded[idx]).flatten()
            if len(kept) == 0:
                return None  # Lightning skips the optimizer step
            scale = len(kept) / b  # the full batch's denominator
            z, cond, t, noise = z[kept], cond[kept.to(cond.device)], t[kept], noise[kept]
        elif ranks > 1:  # this rank's slice of the same global batch: the ranks' gradients
            # average to the one-device step's (equal slices)
            mine = torch.arange(rank, b, ranks)
            z, cond, t, noise = z[mine.to(z.device)], cond[mine.to(cond.device)], t[mine], \
                noise[mine]
        loss = scale * denoising_loss(self.unet, self.alphas_cumprod, z, cond, t.to(z.device),
                                      noise.to(z.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite generator loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 sync_dist=ranks > 1)  # the global batch's loss
        return loss

    def _world(self) -> tuple[int, int]:
        """(this rank, ranks): (0, 1) outside a Trainer or on one device."""
        t = self._trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is None:
            return
        step = self.global_step
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        for e, p in zip(self.ema.parameters(), self.unet.parameters()):
            e.lerp_(p.detach(), 1 - decay)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        total = max(self.hparams.total_steps, warm + 1)
        cosine = self.hparams.lr_schedule == "cosine"

        def factor(s: int) -> float:  # linear warm-up, then constant or cosine down to 10 %
            if s < warm or not cosine:
                return min(1.0, (s + 1) / warm)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (s - warm) / (total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
