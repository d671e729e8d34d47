"""world.kind=encoded: the generator, Fisher and teacher straight from a `coco-encode` folder
(latents in memory, token states memory-mapped), on tiny files in the real formats."""

import json

import numpy as np
import pytest
import torch

from attribution.common.files import DataFileError
from attribution.config import ConfigError, load_config
from attribution.data.text_cache import encoded_table
from tests.conftest import ROOT, smoke_config
from tests.data.test_coco import tiny_sd_parts, write_coco

SIZES = tuple((30 + 3 * i, 28 + 5 * (i % 4)) for i in range(12))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A 12-image COCO folder encoded with a tiny VAE + CLIP text encoder: (root, sd folder)."""
    from diffusers import AutoencoderKL

    from attribution.data.coco import CocoCaptions, encode_coco
    from attribution.generator.text_encoder import load_text_encoder

    tmp = tmp_path_factory.mktemp("encoded")
    coco = write_coco(tmp / "coco", SIZES)
    sd = tiny_sd_parts(tmp / "sd")
    ds = CocoCaptions(coco / "train2017", coco / "captions_train2017.json", image_size=32)
    vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
    enc = load_text_encoder(str(sd), max_length=16)
    encode_coco(ds, vae, enc, tmp / "enc", scale=0.18215, chunk=5, progress=False)
    return tmp / "enc", sd


COCO = ROOT / "configs" / "experiment" / "coco_generator.yaml"
SHRINK = ["generator.unet.block_out_channels=[16,32]", "generator.unet.norm_num_groups=8",
          "generator.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
          "generator.unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]",
          "generator.unet.cross_attention_dim=24", "generator.train.steps=20",
          "generator.train.steps_per_epoch=10", "generator.train.batch_size=8",
          "generator.train.warmup_steps=5", "queries.n_train=3", "queries.n_test=2",
          "queries.sampling.steps=5", "teacher.query_draws=32", "teacher.query_batch_size=32",
          "teacher.timesteps=[200,600]", "teacher.captions=2", "teacher.k=5",
          "teacher.batch_size=64", "text_encoder.max_length=16"]


def encoded_config(root, enc_dir, sd, *overrides):
    """The shipped MSCOCO generator config, shrunk to the tiny encoding."""
    return load_config(COCO, [f"output_root={root}", f"world.root={enc_dir}",
                              f"generator.vae_path={sd / 'vae'}", f"text_encoder.name={sd}",
                              *SHRINK, *overrides])


def test_coco_generator_config_is_the_spec_architecture():
    from attribution.generator.model import build_unet, unet_kwargs

    cfg = load_config(COCO, ["world.root=/data/enc", "generator.vae_path=/m/vae",
                             "text_encoder.name=/m"])
    codec = type("Latents", (), {"channels": 4, "size": 16})()
    kw = unet_kwargs(cfg.generator, codec)
    assert kw["block_out_channels"] == (128, 256, 256, 256) and kw["layers_per_block"] == 2
    assert kw["cross_attention_dim"] == 1024 and kw["in_channels"] == 4
    unet = build_unet(cfg.generator, codec)
    assert sum("CrossAttn" in type(b).__name__ for b in unet.down_blocks) == 3
    assert sum("CrossAttn" in type(b).__name__ for b in unet.up_blocks) == 3
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads == 8
    assert cfg.teacher.timesteps == list(range(0, 1000, 50)) and cfg.teacher.flips
    assert cfg.queries.sampling.guidance == 7.5


def test_token_states_are_read_by_row_from_the_memory_map(encoded):
    from attribution.data.encoded import EncodedWorld
    from attribution.generator.text_encoder import load_text_encoder

    enc_dir, sd = encoded
    world = EncodedWorld(enc_dir)
    states = np.load(enc_dir / "text_embeddings.npy")
    table = encoded_table(world)
    assert table.rows.shape == (12, 5) and table.embeddings.shape == (61, 16, 24)
    rows = torch.tensor([[0, 1 + 3 * 5 + 2], [1 + 11 * 5 + 4, 1]])
    got = table.lookup(rows)
    assert got.shape == (2, 2, 16, 24) and got.dtype == torch.float32
    np.testing.assert_array_equal(got[0, 1].numpy(), states[3, 2].astype(np.float32))
    np.testing.assert_array_equal(got[1, 0].numpy(), states[11, 4].astype(np.float32))
    np.testing.assert_array_equal(got[1, 1].numpy(), states[0, 0].astype(np.float32))
    empty = load_text_encoder(str(sd), max_length=16).encode([""])[0].half().float()
    torch.testing.assert_close(got[0, 0], empty)
    torch.testing.assert_close(table.uncond, empty)
    assert world.captions[3][2] == "a photo number 8 caption 2"  # rows follow sorted ids
    with pytest.raises(IndexError):
        table.lookup(torch.tensor([61]))
    import pickle

    blob = pickle.dumps(table)  # what a spawned rank receives: the path, not the array
    assert len(blob) < states.nbytes
    torch.testing.assert_close(pickle.loads(blob).lookup(rows), got)


def test_flipped_view_is_the_stored_latent_of_the_mirrored_image(encoded):
    """Candidate losses read view 1 from the file (the VAE latent of the mirrored image), and
    equal a hand computation with the same (item, flip, caption, t) noise."""
    from attribution.data.encoded import EncodedWorld
    from attribution.generator.model import build_scheduler, denoising_loss
    from attribution.teacher.candidates import CandidateSet, candidate_losses, loss_plan
    from attribution.teacher.noise import item_noise

    enc_dir, sd = encoded
    world = EncodedWorld(enc_dir)
    cands = CandidateSet(world.latents_tensor(), encoded_table(world).rows, encoded_table(world))
    lat = np.load(enc_dir / "latents.npy")
    np.testing.assert_array_equal(cands.view(torch.tensor([4, 4]), torch.tensor([0, 1])).numpy(),
                                  lat[4])
    cfg = encoded_config("/tmp/unused", enc_dir, sd)
    from attribution.generator.model import VAECodec, build_unet

    torch.manual_seed(0)
    unet = build_unet(cfg.generator, VAECodec(str(sd / "vae"), 0.18215, 32)).eval()
    alphas = build_scheduler(cfg.generator).alphas_cumprod
    items, ts = torch.tensor([2, 7]), [100, 700]
    got = candidate_losses(unet, alphas, cands, items, ts, captions=2, flips=True, seed=3,
                           batch_size=5)
    keys = loss_plan(items, 2, ts, flips=True)
    z = torch.from_numpy(lat[keys[:, 0], keys[:, 1]])
    cond = torch.from_numpy(np.load(enc_dir / "text_embeddings.npy")[keys[:, 0], keys[:, 2]])
    with torch.no_grad():
        want = denoising_loss(unet, alphas, z, cond.float(), keys[:, 3],
                              item_noise(keys, (4, 16, 16), 3), reduce=False)
    torch.testing.assert_close(got, want.view(2, 2, 4).mean(-1), rtol=1e-5, atol=1e-6)


def test_generator_step_draws_views_and_captions_from_the_encoding(encoded):
    """One training step's loss equals a replay of its draws over the files."""
    from attribution.common.seeds import seeded_generator
    from attribution.data.encoded import EncodedWorld
    from attribution.generator.model import VAECodec, build_scheduler, build_unet, denoising_loss
    from attribution.generator.module import GeneratorModule

    enc_dir, sd = encoded
    world = EncodedWorld(enc_dir)
    cfg = encoded_config("/tmp/unused", enc_dir, sd)
    torch.manual_seed(0)
    unet = build_unet(cfg.generator, VAECodec(str(sd / "vae"), 0.18215, 32))
    alphas = build_scheduler(cfg.generator).alphas_cumprod
    module = GeneratorModule(unet, encoded_table(world), world.latents_tensor(), alphas, batch_size=6,
                             cfg_dropout=0.3, ema_decay=0, seed=5)
    with pytest.warns(UserWarning):  # self.log outside a Trainer
        loss = module.training_step(None, 0)
    g = seeded_generator(5, 7, 0)
    idx = torch.randint(12, (6,), generator=g)
    pick = torch.randint(5, (6,), generator=g)
    t = torch.randint(1000, (6,), generator=g)
    noise = torch.randn((6, 4, 16, 16), generator=g)
    drop = torch.rand(6, generator=g) < 0.3
    view = torch.randint(2, (6,), generator=g)
    lat = np.load(enc_dir / "latents.npy")
    states = np.load(enc_dir / "text_embeddings.npy").astype(np.float32)
    z = torch.from_numpy(lat[idx.numpy(), view.numpy()])
    cond = torch.from_numpy(states[idx.numpy(), pick.numpy()])
    cond[drop] = torch.from_numpy(np.load(enc_dir / "uncond.npy").astype(np.float32))
    want = denoising_loss(unet, alphas, z, cond, t, noise)
    torch.testing.assert_close(loss, want)


def test_pipeline_trains_and_runs_the_teacher_on_an_encoded_world(encoded, tmp_path):
    from attribution.pipeline import Pipeline

    enc_dir, sd = encoded
    pipe = Pipeline(encoded_config(tmp_path, enc_dir, sd), progress=False, echo=lambda s: None)
    res = pipe.run()
    assert list(res) == ["world", "text", "generator", "queries", "fisher", "teacher", "ceiling"]
    assert res["text"].summary["memory_mapped"] and res["world"].summary["items"] == 12
    assert res["generator"].summary["steps"] == 20 and pipe.cfg.name == "coco_generator"
    with np.load(pipe.dir("teacher") / "teacher_test.npz") as merged:
        rank = merged["rank"]
    assert rank.shape == (2, 12)
    assert all(sorted(r) == list(range(12)) for r in rank)
    train = np.load(pipe.dir("teacher") / "candidates_train.npy")
    assert train.shape == (3, 5) and train.max() < 12
    prompts = (pipe.dir("queries") / "query_test" / "captions.txt").read_text().splitlines()
    captions = {c for caps in json.loads((enc_dir / "captions.json").read_text()) for c in caps}
    assert prompts and set(prompts) <= captions  # queries are prompted with training captions
    # the same config again: every stage cached
    assert all(r.cached for r in Pipeline(pipe.cfg, progress=False,
                                          echo=lambda s: None).run().values())
    with pytest.raises(ConfigError, match="no images"):
        pipe.run(["features"])


def test_encoded_world_errors_name_the_problem(encoded, tmp_path):
    from attribution.pipeline import Pipeline

    enc_dir, sd = encoded
    with pytest.raises(ConfigError, match="generator.codec=vae"):
        encoded_config(tmp_path, enc_dir, sd, "generator.codec=pixel")
    with pytest.raises(ConfigError, match="needs world.root"):
        smoke_config(tmp_path, "world.kind=encoded", "world.planted=[]")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "latents.npy").write_bytes(b"")
    (partial / "progress.json").write_text('{"rows": 3}')
    pipe = Pipeline(encoded_config(tmp_path, partial, sd), progress=False, echo=lambda s: None)
    with pytest.raises(DataFileError, match="uncond.npy.*resumes"):
        pipe.run(["world"])
    pipe = Pipeline(encoded_config(tmp_path / "b", enc_dir, sd, "text_encoder.max_length=12"),
                    progress=False, echo=lambda s: None)
    with pytest.raises(ConfigError, match="16 tokens"):
        pipe.run(["text"])
    pipe = Pipeline(encoded_config(tmp_path / "c", enc_dir, sd, "text_encoder.name=minilm"),
                    progress=False, echo=lambda s: None)
    with pytest.raises(ConfigError, match="not the encoder"):
        pipe.run(["text"])
    pipe = Pipeline(encoded_config(tmp_path / "d", enc_dir, sd, "generator.latent_scale=0.5"),
                    progress=False, echo=lambda s: None)
    with pytest.raises(ValueError, match="scale 0.18215"):
        pipe.run(["generator"])
