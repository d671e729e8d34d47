"""The MSCOCO path whole (configs/experiment/coco_mini.yaml) over the project's own COCO-layout
sample at smoke size: world -> encode -> generator -> queries -> Fisher -> teacher -> features
(from the JPEGs) -> student -> baselines -> report, every row tied to its COCO id."""

import json

import numpy as np
import pytest
import torch

from attribution.common.files import DataFileError
from attribution.config import load_config
from attribution.data.coco import CocoCaptions, CocoWorld, encode_coco, open_image
from attribution.data.coco_sample import write_coco_sample
from attribution.data.images import center_crop_resize
from tests.conftest import ROOT

MINI = ROOT / "configs" / "experiment" / "coco_mini.yaml"
# coco_mini shrunk to seconds a stage: what the test proves is the path, not the figures
SMOKE = ["world.n_items=40", "generator.unet.block_out_channels=[16,32]",
         "generator.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
         "generator.unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]",
         "generator.train.steps=10", "generator.train.steps_per_epoch=10",
         "generator.train.batch_size=8", "queries.n_train=8", "queries.n_test=4",
         "queries.sampling.steps=4", "teacher.k=10", "teacher.timesteps=[200,600]",
         "teacher.query_draws=8", "teacher.query_batch_size=8", "teacher.fisher_items=16",
         "ceiling.test_queries=2", "ceiling.curation_queries=1", "features.toyclip_steps=5",
         "student.hidden=[32]", "student.epochs=2", "student.queries_per_batch=4",
         "student.pairs_per_query=8", "student.k_eval=[5]", "baselines.dtrak_proj_dim=16",
         "baselines.dtrak_timesteps=[200]"]


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    from attribution.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("coco_run")
    sample = write_coco_sample(tmp / "coco", 60)
    cfg = load_config(MINI, [f"data.root={sample}", f"output_root={tmp / 'runs'}", *SMOKE])
    pipe = Pipeline(cfg, progress=False, echo=lambda s: None)
    return pipe, pipe.run(), sample


def test_raw_coco_folder_runs_to_a_student_and_a_report(coco_run):
    pipe, results, sample = coco_run
    assert {"world", "encode", "text", "generator", "queries", "fisher", "teacher", "ceiling",
            "features", "student", "baselines"} <= set(results)
    assert "fidelity" not in results  # it asks the toy world's attributes
    metrics = json.loads((pipe.root / "metrics.json").read_text())
    # the toy world's keys (curation recall at the teacher's K); the paper's head starts at
    # random, so no whitened row
    for key in ("student.mAP@5", "teacher.self_mAP@5", "teacher.curation_recall@10",
                "baseline.minilm.mAP@5", "baseline.dtrak.mAP@5"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert (pipe.root / "report.md").is_file() and (pipe.root / "report.html").is_file()
    # the world is the 40 lowest ids of the train split (val2017 ignored), in id order
    ids = json.loads((pipe.dir("world") / "ids.json").read_text())
    assert ids == CocoCaptions.from_root(sample).ids[:40]
    # the teacher scored the encoding's rows: the same ids, the text stage reads its states
    assert json.loads((pipe.dir("encode") / "ids.json").read_text()) == ids
    text = json.loads((pipe.dir("text") / "manifest.json").read_text())
    assert text["encoded_root"] == str(pipe.dir("encode"))
    with np.load(pipe.dir("teacher") / "teacher_test.npz") as t:
        assert t["rank"].shape == (4, 40)


def test_encode_stage_is_coco_encode_of_the_same_images(coco_run):
    """The run's encode stage writes what `coco-encode` writes from the JPEGs (pixel codec:
    the crops themselves, both views; the same token states)."""
    from attribution.generator.text_encoder import load_text_encoder

    pipe, _, sample = coco_run
    ds = CocoCaptions.from_root(sample, 16, 5)
    ds.ids, ds.files, ds.captions = ds.ids[:40], ds.files[:40], ds.captions[:40]
    enc = load_text_encoder("minilm", None, pipe.cfg.text_encoder.max_length)
    out = encode_coco(ds, None, enc, pipe.root.parent / "direct", None, pipe.cfg.seed,
                      progress=False)
    stage = pipe.dir("encode")
    for name in ("latents.npy", "text_embeddings.npy", "uncond.npy"):
        assert np.array_equal(np.load(stage / name), np.load(pipe.root.parent / "direct" / name)), name
    assert out["codec"] == "pixel"


def test_features_read_the_original_jpegs_in_id_order(coco_run):
    """An extractor with its own input size sees each item decoded again from its JPEG at that
    size, row i the world's id i (known answer: the crop of that file, through the extractor)."""
    from attribution.features.cache import extract_all
    from attribution.features.extractors import FeatureExtractor

    class Mean(FeatureExtractor):  # a stand-in backbone at 24 px: per-channel means
        name, dim, input_size = "mean24", 3, 24

        def forward(self, images, texts):
            assert images.shape[-1] == 24
            return images.mean((2, 3))

    pipe, _, sample = coco_run
    world = CocoWorld(pipe.dir("world"))
    from attribution.data.dataset import CaptionedImageSet

    out = pipe.root.parent / "feats"
    manifest = extract_all(Mean(), CaptionedImageSet(pipe.dir("world")), {}, out, 16, world)
    feats = np.load(out / "items.npy")
    for row in (0, 17, 39):
        want = center_crop_resize(open_image(sample / "train2017" / f"{world.ids[row]:012d}.jpg"),
                                  24).mean((1, 2))
        assert torch.allclose(torch.from_numpy(feats[row]), want, atol=1e-6)
    assert manifest["item_images"] == "original JPEGs at 24 px"
    from attribution.common.files import sha256_file

    assert manifest["ids_sha256"] == sha256_file(pipe.dir("world") / "ids.json")


def test_a_reordered_encoding_is_refused_before_features(coco_run, tmp_path):
    from attribution.features.stage import coco_rows

    pipe, _, _ = coco_run
    enc = tmp_path / "enc"
    enc.mkdir()
    ids = json.loads((pipe.dir("encode") / "ids.json").read_text())
    (enc / "ids.json").write_text(json.dumps(ids[::-1]))
    with pytest.raises(DataFileError, match="not those of"):
        coco_rows({"world": pipe.dir("world"), "encode": enc})
    assert coco_rows({"world": pipe.dir("world"), "encode": pipe.dir("encode")}).ids == ids


def test_coco_mini_needs_its_folder():
    from attribution.config import ConfigError
    from attribution.pipeline import Pipeline

    with pytest.raises(ConfigError, match="data.root=PATH"):
        load_config(MINI, [])
    # the folder is part of the world's key: another folder is another world
    a, b = (Pipeline(load_config(MINI, [f"data.root=/data/{x}"])) for x in "ab")
    assert a.cfg.world.root == "/data/a" and a.key("world") != b.key("world")


def test_coco_own_plans_its_encoding(tmp_path):
    """The full-size config loads over a raw folder, and the plan prices its encode stage: two
    views of 4 x 16 x 16 float32 latents and 5 x 77 x 1024 float16 token states an item."""
    from attribution.plan import plan

    sample = write_coco_sample(tmp_path / "coco", 12)
    cfg = load_config(ROOT / "configs" / "experiment" / "coco_own.yaml",
                      [f"data.root={sample}", "generator.vae_path=/models/vae"])
    assert cfg.world.kind == "coco" and cfg.student.hidden == [768, 768, 768, 768]
    assert cfg.teacher.gain_scale == "N2" and len(cfg.teacher.timesteps) == 20
    rows = {s.stage: s for s in plan(cfg)}
    assert rows["encode"].written == 12 * (2 * 4 * 16 * 16 * 4 + 5 * 77 * 1024 * 2)
    assert rows["text"].written == 0  # the text stage points at the encoding's states
