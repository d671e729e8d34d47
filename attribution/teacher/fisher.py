"""Fisher information of the unlearned parameters, computed once per generator checkpoint.

- *diagonal* (AbU): F = mean over draws of g⊙g, g the per-item gradient of ℓ at one random
  (caption, t, ε) draw per item and epoch; per-item gradients with torch.func ``grad`` + ``vmap``.
- *EK-FAC* (AbU+): per Linear module, eigenbases of the input-activation and output-gradient
  covariances and the eigenvalue-corrected diagonal Λ in that basis, fitted with kronfluence
  (its factor names — activation/gradient eigenvectors, lambda_matrix, num_lambda_processed —
  are those of the released AbU+ factors).

Saved as safetensors with a manifest naming the generator's weight hash; loading a Fisher
against another generator fails.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from attribution.common.files import DataFileError, atomic_write_bytes
from attribution.common.seeds import seeded_generator
from attribution.generator.model import add_noise, denoising_loss
from attribution.teacher.candidates import CandidateSet


class FisherMismatchError(DataFileError):
    """A Fisher file belongs to another generator checkpoint or parameter group."""


class FisherDraws(Dataset):
    """One (z, cond, t, ε) draw per (epoch, item), a pure function of (seed, epoch, item)."""

    def __init__(self, cands: CandidateSet, n_timesteps: int, epochs: int, seed: int,
                 items: torch.Tensor | None = None):
        self.cands, self.T, self.seed = cands, n_timesteps, seed
        self.items = items if items is not None else torch.arange(len(cands))
        self.epochs = epochs

    def __len__(self) -> int:
        return self.epochs * len(self.items)

    def __getitem__(self, i: int):
        epoch, j = divmod(i, len(self.items))
        item = int(self.items[j])
        g = seeded_generator(self.seed, 41, epoch, item)
        cap = int(torch.randint(self.cands.rows.shape[1], (1,), generator=g))
        t = torch.randint(self.T, (1,), generator=g)[0]
        eps = torch.randn(self.cands.shape, generator=g)
        flip = None
        if self.cands.latents.dim() == 5:  # stored views: one drawn too (after the others)
            flip = torch.randint(self.cands.latents.shape[1], (1,), generator=g)
        cond = self.cands.table.lookup(self.cands.rows[item, cap])
        return self.cands.view(torch.tensor([item]), flip)[0], cond, t, eps


def per_sample_grads(unet: nn.Module, names: list[str], alphas_cumprod: torch.Tensor,
                     measure=None):
    """A function (z, cond, t, eps) batches -> {name: (B, *shape)} per-item gradients of
    ``measure(ε_θ(x_t, t, c), ε)`` — by default the denoising loss ℓ = mean ‖ε_θ − ε‖²."""
    if measure is None:
        def measure(pred, eps):
            return (pred - eps).pow(2).mean()
    from torch.func import functional_call, grad, vmap

    params = dict(unet.named_parameters())
    frozen = {n: p.detach() for n, p in params.items() if n not in names}
    buffers = dict(unet.named_buffers())

    def loss_one(sel, z, cond, t, eps):
        x = add_noise(alphas_cumprod, z[None], eps[None], t[None])
        out = functional_call(unet, ({**frozen, **sel}, buffers), (x, t[None], cond[None]))
        return measure(out.sample, eps[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))

    def fn(z, cond, t, eps):
        return g({n: params[n].detach() for n in names}, z, cond, t, eps)

    return fn


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def diagonal_fisher(unet: nn.Module, names: list[str], alphas_cumprod: torch.Tensor,
                    draws: FisherDraws, batch_size: int = 32, progress: bool = True,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Mean of g⊙g over every draw; {name: tensor shaped like the parameter}.  Float32 only:
    torch.func's per-sample gradients fail under autocast (config/validate.py refuses it)."""
    fn = per_sample_grads(unet, names, alphas_cumprod.to(device))
    params = dict(unet.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    count = 0
    loader = torch.utils.data.DataLoader(draws, batch_size=batch_size, shuffle=False)
    for z, cond, t, eps in tqdm(loader, desc="diagonal Fisher", disable=not progress,
                                leave=False):
        grads = fn(z.to(device), cond.to(device), t.to(device), eps.to(device))
        for n in names:
            total[n] += grads[n].double().pow(2).sum(0)
        count += len(z)
    fisher = {n: (v / count).float().cpu() for n, v in total.items()}
    for n, f in fisher.items():
        if not torch.isfinite(f).all():
            raise FloatingPointError(f"non-finite Fisher for {n}")
    return fisher


def ekfac_factors(unet: nn.Module, module_names: list[str], alphas_cumprod: torch.Tensor,
                  draws: FisherDraws, batch_size: int = 32, progress: bool = True,
                  workdir: Path | None = None, precision: str = "fp32"
                  ) -> dict[str, torch.Tensor]:
    """EK-FAC factors via kronfluence (``precision`` bf16 / fp16: its forward and backward
    passes under autocast, ``amp_dtype``; covariances float32, eigendecomposition float64);
    keys ``<module>.<factor>`` with factor in
    activation_eigenvectors (Din', Din'), gradient_eigenvectors (Dout, Dout),
    lambda_matrix (Dout, Din') summed over samples, num_lambda_processed (scalar);
    Din' = Din + 1 for a Linear with a bias (the constant-1 input column)."""
    import copy
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    class DiffusionTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            z, cond, t, eps = batch
            return denoising_loss(model, alphas_cumprod, z, cond, t, eps, reduce=False).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return list(module_names)

    task = DiffusionTask()
    model = prepare_model(copy.deepcopy(unet).eval(), task)  # prepare_model rewires modules
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        analyzer = Analyzer("abu", model, task, cpu=not torch.cuda.is_available(),
                            disable_tqdm=not progress, output_dir=tmp,
                            log_level=logging.WARNING)
        # every draw (kronfluence caps both fits at 100,000 examples by default: MSCOCO has
        # 118,287 items); teacher.fisher_items chooses fewer items instead
        args = FactorArguments(strategy="ekfac", use_empirical_fisher=True,
                               covariance_max_examples=len(draws),
                               lambda_max_examples=len(draws),
                               amp_dtype=AMP_DTYPES[precision])
        analyzer.fit_all_factors("ekfac", draws, per_device_batch_size=batch_size,
                                 factor_args=args, overwrite_output_dir=True)
        eig = analyzer.load_eigendecomposition("ekfac")
        lam = analyzer.load_lambda_matrices("ekfac")
    out = {}
    for key in ("activation_eigenvectors", "gradient_eigenvectors"):
        for m, v in eig[key].items():
            out[f"{m}.{key}"] = v.float().cpu().contiguous()
    for key in ("lambda_matrix", "num_lambda_processed"):
        for m, v in lam[key].items():
            out[f"{m}.{key}"] = torch.as_tensor(v).float().cpu().contiguous()
    return out


def save_fisher(path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "fisher.safetensors"))
    atomic_write_bytes(path / "fisher.json", json.dumps(manifest, indent=2).encode())


def load_fisher(path: Path, generator_sha256: str, kind: str,
                params: str) -> dict[str, torch.Tensor]:
    """Load a Fisher, refusing one fitted on another generator, kind or parameter group."""
    path = Path(path)
    if not (path / "fisher.json").is_file() or not (path / "fisher.safetensors").is_file():
        raise DataFileError(f"Fisher files missing in {path} (fisher.json, fisher.safetensors)")
    manifest = json.loads((path / "fisher.json").read_text())
    if manifest.get("generator_sha256") != generator_sha256:
        raise FisherMismatchError(
            f"Fisher in {path} was computed for generator weights "
            f"{manifest.get('generator_sha256', '?')[:12]}, not {generator_sha256[:12]}: "
            "recompute it for this checkpoint")
    if manifest.get("kind") != kind or manifest.get("params") != params:
        raise FisherMismatchError(
            f"Fisher in {path} is {manifest.get('kind')}/{manifest.get('params')}, "
            f"expected {kind}/{params}")
    try:
        return load_file(str(path / "fisher.safetensors"))
    except Exception as err:
        raise DataFileError(f"Fisher file is corrupt: {path / 'fisher.safetensors'}") from err
