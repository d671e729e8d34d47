"""The prepared GPU check: what can only be measured on a GPU, in under 10 minutes.

Usage (on a machine with a CUDA GPU, after the README's install):
    python benchmarks/gpu_check.py [--out runs/gpu_check] [--skip-smoke]

1. Counter-based candidate noise drawn on the GPU equals the CPU's (attribution/teacher/noise.py).
2. Bare generator forward rows/s on the GPU at the teacher's batch, for the toy UNet and the
   MSCOCO config's UNet at 128 px (random weights): what ``attribution plan --measure``
   prices a run at on this device.
3. Generator training steps/s for the MSCOCO UNet in fp32 and under bf16 autocast
   (``generator.train.precision``), with the loss of each on one batch.
4. faiss on the GPU (when the ``gpu`` extra is installed): the flat index's top 10 equals the
   CPU's.
5. The smoke pipeline end to end with ``device=cuda`` (every stage on the GPU), its metrics
   printed beside a CPU run's (the two differ by float rounding only where results are
   recorded to the digit: they should agree to ~1e-3).
Prints one line per check; exits non-zero if a check fails.  Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the MSCOCO generator's config with placeholder paths, at the paper's 128 px (16x16 latents)
COCO = ["world.root=/unused", "generator.vae_path=/unused", "world.image_size=128"]


def noise_check() -> bool:
    from attribution.teacher.candidates import loss_plan
    from attribution.teacher.noise import item_noise

    keys = loss_plan(torch.arange(50), 2, [0, 500, 999], flips=True)
    cpu = item_noise(keys, (4, 16, 16), seed=3)
    gpu = item_noise(keys, (4, 16, 16), seed=3, device="cuda").cpu()
    ok = torch.allclose(cpu, gpu, rtol=1e-5, atol=1e-5)
    print(f"noise on the GPU equals the CPU's: {ok} (max |diff| {(cpu - gpu).abs().max():.2e})")
    return ok


def random_unet(config: str, overrides: list[str], batch: int, device: str):
    """The config's UNet with random weights, and one random batch (x, t, c) for it."""
    from attribution.config import load_config
    from attribution.plan import config_unet

    return config_unet(load_config(ROOT / config, overrides), batch, device)


def train_rate(config: str, overrides: list[str], batch: int, dtype: torch.dtype | None,
               device: str = "cuda", steps: int = 10) -> tuple[float, float]:
    """(training steps/s, the first step's loss) of the config's UNet at ``batch``: forward,
    backward and an AdamW step, under autocast to ``dtype`` (None: float32)."""
    unet, (x, t, c) = random_unet(config, overrides, batch, device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    losses = []
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            sync()
            start = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = (unet(x, t, c).sample.float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    sync()
    return steps / (time.perf_counter() - start), losses[0]


def forward_rate(config: str, overrides: list[str], batch: int) -> tuple[float, str]:
    """Bare forward rows/s of the config's UNet (random weights) at ``batch`` on the GPU, as
    ``attribution plan --measure`` times it."""
    from attribution.config import load_config
    from attribution.plan import measure_forwards_per_second

    cfg = load_config(ROOT / config, [*overrides, "device=cuda", f"teacher.batch_size={batch}"])
    return measure_forwards_per_second(cfg)


def faiss_check() -> bool:
    import faiss
    import numpy as np

    from attribution import retrieval

    if not hasattr(faiss, "StandardGpuResources"):
        print("faiss GPU: not installed (faiss-cpu): skipped")
        return True
    x = np.random.default_rng(0).standard_normal((20000, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, cpu = retrieval.search(retrieval.build_index(x), x[:50], 10)
    _, gpu = retrieval.search(retrieval.build_index(x, gpu=True), x[:50], 10)
    ok = (cpu == gpu).mean() > 0.99
    print(f"faiss GPU flat index top 10 equals the CPU's: {ok} ({(cpu == gpu).mean():.4f})")
    return ok


def smoke(out: Path) -> bool:
    got = {}
    for device in ("cuda", "cpu"):
        cmd = [sys.executable, "-m", "attribution", "run", "configs/experiment/toy_smoke.yaml",
               f"device={device}", f"output_root={out / device}", "--no-progress"]
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            print(f"smoke run on {device} failed:\n{proc.stderr[-2000:]}")
            return False
        got[device] = json.loads((out / device / "toy_smoke" / "metrics.json").read_text())
        print(f"smoke run on {device}: {time.time() - start:.0f} s")
    for key in ("student.mAP@5", "teacher.self_mAP@5", "baseline.dtrak.mAP@5"):
        print(f"  {key}: cuda {got['cuda'].get(key)}  cpu {got['cpu'].get(key)}")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--skip-smoke", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this check needs one")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    ok = noise_check()
    for name, overrides, batch in (("toy", [], 500), ("coco_generator", COCO, 256)):
        rate, what = forward_rate(f"configs/experiment/{name}.yaml", overrides, batch)
        print(f"bare forward rows/s, {name}: {rate:,.0f} ({what})")
    coco_args = ("configs/experiment/coco_generator.yaml", COCO, 64)
    (f32, l32), (b16, lb16) = (train_rate(*coco_args, dtype) for dtype in (None, torch.bfloat16))
    print(f"MSCOCO UNet training steps/s at batch 64: fp32 {f32:.2f}, bf16 {b16:.2f} "
          f"({b16 / f32:.2f}x); first-step loss fp32 {l32:.4f}, bf16 {lb16:.4f} (same weights "
          "and batch: they should agree to about 1 %)")
    ok = faiss_check() and ok
    if not args.skip_smoke:
        ok = smoke(args.out) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
