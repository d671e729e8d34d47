"""Teacher benchmark: seconds per query, generator forwards/s, batched vs per-item loop, and
the teacher's scoring as a share of a bare batched forward of the same UNet.

Usage:  python benchmarks/teacher_bench.py [CONFIG] [key=value ...] [--items 300]
            [--unet-of configs/experiment/coco_generator.yaml --unet-batch 32 --unet-image-size 128]

Uses (and if needed builds) the pipeline's cached world, generator, Fisher and queries for
CONFIG (default: the smoke config, so it runs from a fresh clone in about a minute).  Both
scoring paths run on the same query and the same candidate items, one after the other.  The
bare forward runs the UNet alone, repeatedly, on one prepared batch of the teacher's own rows
(noised latents, timesteps, token states): the most any implementation of the candidates'
loss can reach on this machine, so the share says what is left to gain in the scoring loop.
``--unet-of`` times the same two for another config's UNet (the MSCOCO generator's): random
weights, synthetic latents and token states of its shapes (throughput does not depend on the
values; its data paths are not read), a few batches of ``--unet-batch`` rows.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from _common import machine_line, pipeline_args

from attribution.config import derive, load_config
from attribution.data.text_cache import TextTable
from attribution.generator.model import add_noise, build_scheduler, build_unet
from attribution.teacher.candidates import CandidateSet, candidate_losses, loss_plan, plan_inputs
from attribution.teacher.run import teacher_scorer


@torch.no_grad()
def bare_forward_rate(unet, alphas, cands, ids, tc, seed: int, rows: int) -> float:
    """UNet forwards/s alone on one prepared batch of the teacher's rows, about ``rows`` in all."""
    keys = loss_plan(ids, tc.captions, list(tc.timesteps), tc.flips)[: tc.batch_size]
    z, cond, t, eps = plan_inputs(cands, keys, seed)
    x = add_noise(alphas, z, eps, t)
    unet(x, t, cond)  # warm-up
    repeats = max(1, rows // len(keys))
    t0 = time.perf_counter()
    for _ in range(repeats):
        unet(x, t, cond)
    return repeats * len(keys) / (time.perf_counter() - t0)


def other_unet_share(path: str, batch: int, image_size: int, items: int = 2,
                     seed: int = 0) -> str:
    """The candidate-loss loop against a bare forward for the UNet of the config at ``path``
    (an encoded-world config: its paths are placeholders here), on synthetic inputs."""
    cfg = load_config(path, ["world.root=unused", "generator.vae_path=unused"])
    cfg = derive(cfg, {"teacher": {"batch_size": batch}})
    tc, g = cfg.teacher, cfg.generator
    size = image_size // 8  # the VAE's latent side (an encoded world records its image size)
    torch.manual_seed(seed)
    unet = build_unet(g, SimpleNamespace(size=size, channels=4)).eval()
    alphas = build_scheduler(g).alphas_cumprod
    n_caps = tc.captions
    table = TextTable(torch.randn(items * n_caps + 1, cfg.text_encoder.max_length,
                                  g.unet.cross_attention_dim).half(),
                      torch.arange(1, items * n_caps + 1).view(items, n_caps),
                      [""] * (items * n_caps + 1))
    cands = CandidateSet(torch.randn(items, 2, 4, size, size), table.rows, table)
    ids = torch.arange(items)
    rows = len(loss_plan(ids, tc.captions, list(tc.timesteps), tc.flips))
    common = (unet, alphas, cands, ids, list(tc.timesteps), tc.captions, tc.flips, seed)
    candidate_losses(*common, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    candidate_losses(*common, batch_size=batch)
    loop = rows / (time.perf_counter() - t0)
    bare = bare_forward_rate(unet, alphas, cands, ids, tc, seed, rows)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    return (f"{path}: UNet {params:.0f} M parameters, latents 4x{size}x{size}, {rows} rows "
            f"in batches of {batch}: scoring {loop:.1f} forwards/s, bare forward {bare:.1f}/s, "
            f"share {loop / bare:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=300, help="candidates timed in both paths")
    ap.add_argument("--unet-of", default=None, help="also time this config's UNet (synthetic)")
    ap.add_argument("--unet-batch", type=int, default=32, help="rows a batch for --unet-of")
    ap.add_argument("--unet-image-size", type=int, default=128,
                    help="--unet-of's image side (the paper's MSCOCO generator: 128)")
    args, cfg, pipe = pipeline_args(ap)
    pipe.run(["fisher", "queries"])
    scorer, cands, queries = teacher_scorer(pipe.cfg, pipe.dirs(), "test")
    tc = cfg.teacher
    per_item = tc.captions * len(tc.timesteps) * (2 if tc.flips else 1)
    n = min(args.items, len(cands))
    ids = torch.arange(n)
    common = (scorer.unet, scorer.alphas, cands, ids, list(tc.timesteps), tc.captions, tc.flips,
              cfg.seed)
    candidate_losses(*common, batch_size=tc.batch_size)  # warm-up
    t0 = time.perf_counter()
    batched = candidate_losses(*common, batch_size=tc.batch_size)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = candidate_losses(*common, batch_size=1)
    t_loop = time.perf_counter() - t0
    assert torch.allclose(batched, loop, atol=1e-5), "batched and loop losses differ"
    bare = bare_forward_rate(scorer.unet, scorer.alphas, cands, ids, tc, cfg.seed,
                             n * per_item)
    q = queries[0]
    t0 = time.perf_counter()
    res = scorer.score(q)
    t_query = time.perf_counter() - t0
    fwd = n * per_item
    print(machine_line())
    print(f"config: {args.config} {' '.join(args.overrides)}")
    print(f"training items N={len(cands)}; forwards per candidate={per_item} "
          f"({tc.captions} captions x {len(tc.timesteps)} timesteps x "
          f"{2 if tc.flips else 1} views); query draws={tc.query_draws}")
    print(f"{'path':<28}{'seconds':>10}{'forwards/s':>13}")
    label = f"batched (bs={tc.batch_size})"
    print(f"{label:<28}{t_batched:>10.3f}{fwd / t_batched:>13.1f}")
    print(f"{'per-item loop (bs=1)':<28}{t_loop:>10.3f}{fwd / t_loop:>13.1f}")
    print(f"{'bare UNet forward':<28}{'':>10}{bare:>13.1f}")
    print(f"speed-up of batched over loop: {t_loop / t_batched:.1f}x (same {n} items, same losses)")
    print(f"teacher scoring at {fwd / t_batched / bare:.0%} of a bare batched forward "
          f"(bs={tc.batch_size}, the same UNet and rows)")
    print(f"one full test query (N={len(cands)} candidates + unlearning step): "
          f"{t_query:.2f} s/query; query loss {res['query_loss_before']:.4f} -> "
          f"{res['query_loss_after']:.4f}")
    if args.unet_of:
        print(other_unet_share(args.unet_of, args.unet_batch, args.unet_image_size))


if __name__ == "__main__":
    main()
