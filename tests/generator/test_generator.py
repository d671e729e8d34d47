import pytest
import torch

from attribution.common.files import DataFileError
from attribution.generator.model import (
    build_codec,
    build_scheduler,
    build_unet,
    denoising_loss,
    load_unet,
)
from attribution.generator.sampling import sample
from attribution.generator.train import train_generator
from tests.conftest import smoke_config


def _weights(path):
    unet, _ = load_unet(path)
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_resume_equals_uninterrupted(smoke_run, tmp_path):
    world, text = smoke_run.dir("world"), smoke_run.dir("text")
    full = smoke_config(tmp_path, "generator.train.steps=20", "generator.train.steps_per_epoch=10")
    train_generator(full, world, text, tmp_path / "full", progress=False)
    # "killed" after the first epoch: a 10-step run leaves last.ckpt; the 20-step run resumes it
    half = smoke_config(tmp_path, "generator.train.steps=10", "generator.train.steps_per_epoch=10")
    train_generator(half, world, text, tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / "checkpoints" / "last.ckpt").is_file()
    out = train_generator(full, world, text, tmp_path / "resumed", progress=False)
    assert out["steps"] == 20
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # and training actually moved the weights away from a fresh init
    fresh = build_unet(full.generator, build_codec(full.generator, 16)).state_dict()
    assert any(not torch.allclose(fresh[k], a[k]) for k in a)


def test_leave_out_shares_every_other_random_number(smoke_run, tmp_path):
    """Leave-K-out retraining drops the excluded draws from the full run's batches: excluding
    items no step draws reproduces the full run bit for bit; excluding one drawn item changes it."""
    from attribution.common.seeds import seeded_generator

    world, text = smoke_run.dir("world"), smoke_run.dir("text")
    cfg = smoke_config(tmp_path, "generator.train.steps=4", "generator.train.steps_per_epoch=4")
    n, b = smoke_run.cfg.world.n_items, cfg.generator.train.batch_size
    drawn = set()
    for step in range(4):  # replay the batches' item draws (the first draw of each step)
        drawn |= set(torch.randint(n, (b,), generator=seeded_generator(cfg.seed, 7, step))
                     .tolist())
    never = [i for i in range(n) if i not in drawn][:3]
    assert never, "smoke batches cover every item: shrink the batch for this test"
    train_generator(cfg, world, text, tmp_path / "full", progress=False)
    train_generator(cfg, world, text, tmp_path / "never", progress=False, exclude=never)
    train_generator(cfg, world, text, tmp_path / "one", progress=False, exclude=[min(drawn)])
    full, same, other = (_weights(tmp_path / d) for d in ("full", "never", "one"))
    assert all(torch.equal(full[k], same[k]) for k in full)
    assert any(not torch.equal(full[k], other[k]) for k in full)
    with pytest.raises(ValueError, match="exclude ids"):
        train_generator(cfg, world, text, tmp_path / "bad", progress=False, exclude=[n])


def test_corrupt_training_checkpoint_is_named(smoke_run, tmp_path):
    cfg = smoke_config(tmp_path, "generator.train.steps=20")
    (tmp_path / "g" / "checkpoints").mkdir(parents=True)
    (tmp_path / "g" / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataFileError, match="last.ckpt"):
        train_generator(cfg, smoke_run.dir("world"), smoke_run.dir("text"), tmp_path / "g",
                        progress=False)


def test_sampling_is_deterministic_and_batch_invariant(smoke_run):
    unet, _ = load_unet(smoke_run.dir("generator"))
    cfg = smoke_run.cfg
    sched = build_scheduler(cfg.generator)
    torch.manual_seed(0)
    cond, uncond = torch.randn(4, 20, 384), torch.randn(20, 384)
    kw = dict(shape=(3, 16, 16), seed=3, sampler="ddpm", steps=4, guidance=2.0, progress=False)
    a = sample(unet, sched, cond, uncond, [0, 1, 2, 3], batch_size=4, **kw)
    b = sample(unet, sched, cond, uncond, [0, 1, 2, 3], batch_size=4, **kw)
    c = sample(unet, sched, cond, uncond, [0, 1, 2, 3], batch_size=2, **kw)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-4)
    d = sample(unet, sched, cond, uncond, [0, 1, 2, 3], batch_size=4,
               **{**kw, "sampler": "ddim", "seed": 4})
    assert not torch.allclose(a, d)


def test_corrupt_generator_weights_are_named(smoke_run, tmp_path):
    import shutil

    dst = tmp_path / "gen"
    shutil.copytree(smoke_run.dir("generator") / "unet", dst / "unet")
    shutil.copy(smoke_run.dir("generator") / "generator.json", dst)
    weights = dst / "unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match="diffusion_pytorch_model.safetensors"):
        load_unet(dst)
    with pytest.raises(DataFileError, match="generator.json"):
        load_unet(tmp_path / "nothing")


def test_vae_codec_loads_by_path_and_trains_in_latent_space(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                  norm_num_groups=4, sample_size=16).save_pretrained(tmp_path / "vae")
    cfg = smoke_config(tmp_path, "generator.codec=vae", f"generator.vae_path={tmp_path / 'vae'}")
    codec = build_codec(cfg.generator, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x, torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and codec.decode(z).shape == (2, 3, 16, 16)
    unet = build_unet(cfg.generator, codec)
    loss = denoising_loss(unet, build_scheduler(cfg.generator).alphas_cumprod, z,
                          torch.randn(2, 20, 384), torch.tensor([10, 500]), torch.randn_like(z))
    assert torch.isfinite(loss)
    with pytest.raises(FileNotFoundError, match="missing-vae"):
        build_codec(smoke_config(tmp_path, "generator.codec=vae",
                                 f"generator.vae_path={tmp_path / 'missing-vae'}").generator, 16)


def test_bf16_training_autocasts_and_keeps_float32_weights(smoke_run, tmp_path):
    """generator.train.precision=bf16 trains under autocast: the steps see bf16 rounding (the
    weights end near, not at, the float32 run's), the saved weights stay float32 and the loss
    finite; the fp32 key is the one generators had before the setting existed."""
    from attribution.config import ConfigError
    from attribution.stage_table import key_sections

    world, text = smoke_run.dir("world"), smoke_run.dir("text")
    steps = ["generator.train.steps=6", "generator.train.steps_per_epoch=6"]
    fp32 = smoke_config(tmp_path, *steps)
    bf16 = smoke_config(tmp_path, *steps, "generator.train.precision=bf16")
    a = train_generator(fp32, world, text, tmp_path / "fp32", progress=False)
    b = train_generator(bf16, world, text, tmp_path / "bf16", progress=False)
    assert torch.isfinite(torch.tensor([a["final_loss"], b["final_loss"]])).all()
    wa, wb = _weights(tmp_path / "fp32"), _weights(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in wb.values())
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    scale = max(float(v.abs().max()) for v in wa.values())
    assert 0 < diff < 0.1 * scale  # rounded differently, trained the same
    assert "precision" not in key_sections(fp32, "generator")[0]["train"]
    assert key_sections(bf16, "generator")[0]["train"]["precision"] == "bf16"
    with pytest.raises(ConfigError, match="precision=fp16 needs device=cuda"):
        smoke_config(tmp_path, "generator.train.precision=fp16")
