
import numpy as np
import pytest
import torch

from attribution.common.files import DataFileError
from attribution.data import toy_world
from attribution.data.dataset import CaptionedImageSet, write_world
from attribution.data.queries import QuerySet, write_query_set
from attribution.features.cache import StaleFeatureCache, extract_all, load_features
from attribution.features.extractors import OpenClip, TimmImage, build_extractor
from tests.conftest import tiny_open_clip


@pytest.fixture()
def tiny_world(tmp_path):
    images, caps, attrs = toy_world.generate_world(40, 16, 2, 0.5, [], seed=0)
    write_world(tmp_path / "w", images, caps, attrs, {})
    write_query_set(tmp_path / "q", images[:5], [c[0] for c in caps[:5]],
                    np.zeros((5, 3, 16, 16)), np.zeros((5, 2, 3)))
    return CaptionedImageSet(tmp_path / "w"), {"test": QuerySet(tmp_path / "q")}


def test_concat_and_l2_per_block(tiny_world):
    world, _ = tiny_world
    ctx = {"image_size": 16, "weights": {}, "arch": {}}
    ext = build_extractor("pixels+minilm", ctx, l2_per_block=True)
    assert ext.dim == 3 * 16 * 16 + 384
    f = ext.extract(world.all_images()[:4], [c[0] for c in world.captions[:4]])
    norms = [f[:, :768].norm(dim=1), f[:, 768:].norm(dim=1)]
    for n in norms:
        torch.testing.assert_close(n, torch.ones(4))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_extractor("pixels+dinoo", ctx)


def test_minilm_text_features_carry_meaning():
    ext = build_extractor("minilm", {"weights": {}, "arch": {}})
    f = ext.extract(torch.zeros(3, 3, 16, 16), ["a red circle", "a red disc", "navy background"])
    assert f[0] @ f[1] > f[0] @ f[2]


def test_cache_manifest_and_stale_refusal(tiny_world, tmp_path):
    world, queries = tiny_world
    ext = build_extractor("pixels", {"image_size": 16})
    extract_all(ext, world, queries, tmp_path / "f")
    feats = load_features(tmp_path / "f", expect_items=40, expect_name="pixels")
    assert feats["items"].shape == (40, 768) and feats["query_test"].shape == (5, 768)
    np.testing.assert_allclose(feats["items"][0], world.image_tensor(0).flatten().numpy())
    with pytest.raises(StaleFeatureCache, match="40 items"):
        load_features(tmp_path / "f", expect_items=41)
    with pytest.raises(StaleFeatureCache, match="'pixels'"):
        load_features(tmp_path / "f", expect_name="minilm")
    np.save(tmp_path / "f" / "items.npy", np.zeros((39, 768), np.float32))
    with pytest.raises(StaleFeatureCache, match="stale"):
        load_features(tmp_path / "f")
    (tmp_path / "f" / "manifest.json").unlink()
    with pytest.raises(DataFileError, match="manifest"):
        load_features(tmp_path / "f")


def test_timm_backbone_saved_and_loaded_by_path(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    ext = TimmImage("test_vit", str(tmp_path / "w.pth"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        up = torch.nn.functional.interpolate((x + 1) / 2, size=(ext.size, ext.size),
                                             mode="bicubic", align_corners=False)
        expected = ref((up - ext.mean) / ext.std)
    torch.testing.assert_close(ext.extract(x, ["", ""]), expected)
    with pytest.raises(FileNotFoundError):
        TimmImage("test_vit", str(tmp_path / "missing.pth"))


def test_no_silent_random_weights(tmp_path, monkeypatch):
    """Without a weights file, the hub cache must supply them; here it cannot -> clear error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hub"))
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        TimmImage("test_vit", None)
    with pytest.raises(FileNotFoundError, match="weights"):
        OpenClip("ViT-B-32", None, "image")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        OpenClip("ViT-B-32", str(tmp_path / "nope.pt"), "image")


def test_open_clip_image_and_text_towers_by_path(tmp_path):
    import open_clip

    model, _ = tiny_open_clip(tmp_path, "tiny-clip-feat")
    img = OpenClip("tiny-clip-feat", str(tmp_path / "w.pt"), "image")
    txt = OpenClip("tiny-clip-feat", str(tmp_path / "w.pt"), "text")
    assert img.extract(torch.zeros(2, 3, 16, 16), ["a", "b"]).shape == (2, 16)
    tok = open_clip.get_tokenizer("tiny-clip-feat")
    with torch.no_grad():
        ref = model.encode_text(tok(["a red circle"]))
    torch.testing.assert_close(txt.extract(torch.zeros(1, 3, 16, 16), ["a red circle"]), ref)
