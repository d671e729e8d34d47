"""Real COCO's quirks on the project's own COCO-layout sample (attribution/data/coco_sample.py):
every quirk read as a viewer shows it, every broken input one clear error before model work."""

import json

import numpy as np
import pytest
from PIL import Image

from attribution.common.files import DataFileError
from attribution.data.coco import CocoCaptions, open_image
from attribution.data.coco_sample import KINDS, save_jpeg, write_coco_sample
from tests.conftest import assert_clear, run_cli


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_coco_sample(tmp_path_factory.mktemp("coco_sample"), n=14, seed=3)


def _captions_file(root):
    return root / "annotations" / "captions_train2017.json"


def test_the_sample_has_every_quirk(sample):
    data = json.loads(_captions_file(sample).read_text(encoding="utf-8"))
    ids = [im["id"] for im in data["images"]]
    assert ids != sorted(ids) and sorted(ids) != list(range(min(ids), min(ids) + len(ids)))
    counts = np.bincount(np.unique([a["image_id"] for a in data["annotations"]],
                                   return_inverse=True)[1])
    assert counts.min() >= 5 and counts.max() <= 7 and counts.min() < counts.max()
    texts = [a["caption"] for a in data["annotations"]]
    assert any("\n" in t for t in texts) and any("  " in t for t in texts)
    assert any(not t.isascii() for t in texts) and any(t.isupper() for t in texts)
    modes = {Image.open(sample / "train2017" / im["file_name"]).mode for im in data["images"]}
    assert {"L", "CMYK", "RGB"} <= modes
    assert (sample / "val2017").is_dir() and (sample / "annotations" /
                                              "captions_val2017.json").is_file()


def test_reader_sorts_ids_tidies_captions_and_ignores_val(sample):
    ds = CocoCaptions.from_root(sample, image_size=16)
    assert len(ds) == 14 and ds.ids == sorted(ds.ids)
    assert all(len(c) == 5 for c in ds.captions)
    flat = [t for c in ds.captions for t in c]
    assert all(t == " ".join(t.split()) for t in flat)  # no stray spaces or newlines left
    assert any("très réussi" in t for t in flat)  # non-ASCII kept as written
    ds.check_images(progress=False)
    for i in range(len(ds)):  # every kind decodes to the model's RGB square
        x = ds.image_tensor(i)
        assert x.shape == (3, 16, 16) and -1 <= float(x.min()) <= float(x.max()) <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_jpeg_reads_as_the_image_a_viewer_shows(tmp_path, kind):
    """Known answers: the image read back is the one written, upright and in RGB (within JPEG
    loss; a grayscale file reads as its luminance in all three channels)."""
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 256, (3, 5, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    img = Image.fromarray(base)  # 80 x 48 in 16-pixel blocks (JPEG's colour blocks): kept
    save_jpeg(img, tmp_path / "x.jpg", kind)
    got = np.asarray(open_image(tmp_path / "x.jpg")).astype(float)
    want = np.asarray(img.convert("L").convert("RGB") if kind == "grayscale" else img, float)
    assert got.shape == want.shape == (48, 80, 3)
    err = np.abs(got - want).mean()
    assert err < 6 < np.abs(got - want[::-1, ::-1]).mean(), (kind, err)  # upright, not turned
    if kind == "exif_rotated":  # the stored pixels are turned; the tag turns them back
        assert Image.open(tmp_path / "x.jpg").size == (48, 80)


def _broken(sample, tmp_path, edit):
    """A copy of the sample's train split with ``edit(data, folder)`` applied."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(sample, root)
    data = json.loads(_captions_file(root).read_text(encoding="utf-8"))
    edit(data, root / "train2017")
    _captions_file(root).write_text(json.dumps(data), encoding="utf-8")
    return root


def _drop_captions(data, folder):
    target = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != target]


def _duplicate_id(data, folder):
    data["images"].append(dict(data["images"][0], file_name="copy.jpg"))


def _unlisted(data, folder):
    data["annotations"].append({"id": 1, "image_id": -5, "caption": "a stray caption"})


def _missing_file(data, folder):
    (folder / data["images"][0]["file_name"]).unlink()


BROKEN = [(_drop_captions, "has 0"), (_duplicate_id, "listed more than once"),
          (_unlisted, "image id -5"), (_missing_file, "are not in")]


@pytest.mark.parametrize("edit, message", BROKEN, ids=[e.__name__ for e, _ in BROKEN])
def test_broken_captions_file_is_one_error_naming_the_problem(sample, tmp_path, edit, message):
    root = _broken(sample, tmp_path, edit)
    with pytest.raises(DataFileError, match=message):
        CocoCaptions.from_root(root, image_size=16)


def test_garbled_captions_file_and_undecodable_jpeg_fail_before_the_models_load(
        sample, tmp_path, capsys):
    root = _broken(sample, tmp_path, lambda data, folder: None)
    bad = sorted((root / "train2017").glob("*.jpg"))[3]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the header reads, the pixels do not
    ds = CocoCaptions.from_root(root, image_size=16)  # the captions file itself is fine
    with pytest.raises(DataFileError, match=bad.name):
        ds.check_images(progress=False)
    # the command checks every image before it loads the VAE (which does not exist here)
    code, _, err = run_cli(capsys, "coco-encode", "--images", root / "train2017", "--captions",
                           _captions_file(root), "--vae", tmp_path / "no-vae",
                           "--text-encoder", tmp_path / "no-te", "--out", tmp_path / "enc")
    assert_clear(code, err.strip().splitlines()[-1], bad.name)  # after the check's bar
    _captions_file(root).write_text("{not json")
    with pytest.raises(DataFileError, match="not a COCO captions file"):
        CocoCaptions.from_root(root, image_size=16)
