import hashlib

import numpy as np
import pytest

from attribution.common.files import DataFileError
from attribution.data import toy_world
from attribution.data.dataset import CaptionedImageSet, write_world

PLANTED = [{"attribute": "shape", "value": "cross", "count": 5},
           {"attribute": "colour", "value": "pink", "count": 3}]


def _world(seed=0, n=300):
    return toy_world.generate_world(n, 16, 3, 0.7, PLANTED, seed)


def test_same_seed_same_bytes(tmp_path):
    digests = []
    for sub in ("a", "b"):
        images, caps, attrs = _world(seed=4)
        write_world(tmp_path / sub, images, caps, attrs, {"seed": 4})
        digests.append({f: hashlib.sha256((tmp_path / sub / f).read_bytes()).hexdigest()
                        for f in ("images.npy", "captions.json", "attributes.json")})
    assert digests[0] == digests[1]
    other, _, _ = _world(seed=5)
    assert not np.array_equal(other, _world(seed=4)[0])


def test_planted_concepts_are_exact_and_rare():
    _, caps, attrs = _world()
    assert sum(a["shape"] == "cross" for a in attrs) == 5
    assert sum(a["colour"] == "pink" for a in attrs) == 3
    # the planted word appears only in the planted items' captions
    with_word = [i for i, c in enumerate(caps) if any("cross" in s for s in c)]
    assert with_word == [i for i, a in enumerate(attrs) if a["shape"] == "cross"]
    # the Zipf skew makes the first value of an attribute more common than the last
    counts = [sum(a["colour"] == v for a in attrs) for v in toy_world.ATTRIBUTES["colour"]]
    assert counts[0] > 2 * counts[-1]


def test_render_known_pixels():
    img = toy_world.render({"shape": "square", "colour": "red", "position": "center",
                            "size": "large", "texture": "solid", "background": "black"}, 16)
    assert tuple(img[8, 8]) == toy_world.RGB["red"]
    assert tuple(img[0, 0]) == (0, 0, 0)


def test_dataset_interface_and_flip(tmp_path):
    images, caps, attrs = _world()
    write_world(tmp_path, images, caps, attrs, {})
    ds = CaptionedImageSet(tmp_path)
    item = ds[3]
    assert item["image"].shape == (3, 16, 16) and item["index"] == 3
    assert item["captions"] == caps[3] and -1 <= item["image"].min() <= item["image"].max() <= 1
    flipped = ds.get(3, flip=True)["image"]
    assert np.array_equal(flipped.numpy(), item["image"].flip(-1).numpy())
    with pytest.raises(IndexError):
        ds.get(len(ds))


def test_corrupt_or_missing_files_are_named(tmp_path):
    images, caps, attrs = _world()
    write_world(tmp_path, images, caps, attrs, {})
    raw = bytearray((tmp_path / "images.npy").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "images.npy").write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match="images.npy"):
        CaptionedImageSet(tmp_path)
    (tmp_path / "captions.json").unlink()
    with pytest.raises(DataFileError, match="captions.json"):
        CaptionedImageSet(tmp_path, verify=False)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataFileError, match="manifest"):
        CaptionedImageSet(tmp_path)


def test_bad_planted_concept():
    with pytest.raises(ValueError, match="common value"):
        toy_world.generate_world(50, 16, 3, 0.7, [{"attribute": "shape", "value": "circle",
                                                   "count": 2}], 0)
