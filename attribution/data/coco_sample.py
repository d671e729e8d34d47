"""A small folder in the MSCOCO 2017 captions layout, written by the project itself, with the
quirks of the real set — so the COCO path is tested without COCO.

The scenes are the toy world's (``toy_world.render``: a shape of some colour, size, texture and
position on a background), each pasted at the centre of a canvas of its own size and aspect
ratio, so the reader's centre crop recovers the scene.  Quirks, by item:

- image files: baseline, grayscale (``L``), CMYK, progressive, and EXIF-rotated JPEGs (stored
  turned a quarter, with an Orientation tag that turns them back);
- sizes from 40 × 40 up to 160 × 72, landscape and portrait;
- 5 to 7 captions per image, with stray spaces, newlines, capitals and non-ASCII letters;
- image ids neither contiguous nor sorted, images and annotations listed in shuffled order;
- a ``val2017`` split beside the train split (which the reader must ignore).

``write_coco_sample(root, n)`` -> root, holding ``annotations/captions_train2017.json``,
``annotations/captions_val2017.json``, ``train2017/*.jpg`` and ``val2017/*.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from attribution.data.toy_world import BACKGROUND_RGB, TEMPLATES, caption, sample_attributes
from attribution.data.toy_world import render as render_scene

SIZES = ((64, 48), (48, 80), (160, 72), (40, 40), (90, 120), (75, 56), (56, 100))
KINDS = ("baseline", "grayscale", "cmyk", "progressive", "exif_rotated")


def quirky_captions(attrs: dict[str, str], rng: np.random.Generator) -> list[str]:
    """5 to 7 captions of one scene, some with stray whitespace, capitals or non-ASCII."""
    order = rng.permutation(len(TEMPLATES))
    caps = [caption(attrs, int(t)) for t in order]
    caps.append(caps[0].upper())  # a 7th, shouting
    caps = caps[: int(rng.integers(5, 8))]
    caps[1] = f"  {caps[1]}  \n"
    caps[2] = caps[2].replace(" ", "   ", 1).capitalize()
    caps[3] = f"{caps[3]} — très réussi"
    return caps


def scene_image(attrs: dict[str, str], size: tuple[int, int], scene: int) -> Image.Image:
    """The scene at ``scene`` pixels, centred on a ``size`` canvas of its background colour."""
    canvas = Image.new("RGB", size, BACKGROUND_RGB[attrs["background"]])
    s = min(size)
    img = Image.fromarray(render_scene(attrs, scene)).resize((s, s), Image.BICUBIC)
    canvas.paste(img, ((size[0] - s) // 2, (size[1] - s) // 2))
    return canvas


def save_jpeg(img: Image.Image, path: Path, kind: str) -> None:
    """One JPEG of the given quirk (module docstring)."""
    if kind == "grayscale":
        img.convert("L").save(path, quality=95)
    elif kind == "cmyk":
        img.convert("CMYK").save(path, quality=95)
    elif kind == "progressive":
        img.save(path, quality=95, progressive=True)
    elif kind == "exif_rotated":  # stored turned 90° counter-clockwise; tag 6: turn it back
        exif = Image.Exif()
        exif[0x0112] = 6
        img.rotate(90, expand=True).save(path, quality=95, exif=exif)
    else:
        img.save(path, quality=95)


def _split(root: Path, split: str, n: int, rng: np.random.Generator, scene: int) -> None:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    ids = [int(i) for i in rng.choice(10**6, n, replace=False)]  # unique, scattered, unsorted
    images, anns = [], []
    for k, (image_id, attrs) in enumerate(zip(ids, sample_attributes(rng, n, 1.0))):
        name = f"{image_id:012d}.jpg"
        size = SIZES[k % len(SIZES)]
        save_jpeg(scene_image(attrs, size, scene), folder / name, KINDS[k % len(KINDS)])
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        anns += [{"image_id": image_id, "caption": c} for c in quirky_captions(attrs, rng)]
    ann_ids = rng.choice(10**7, len(anns), replace=False)
    for a, i in zip(anns, ann_ids):
        a["id"] = int(i)
    data = {"info": {"description": "attribution's COCO-layout sample"},
            "images": [images[i] for i in rng.permutation(len(images))],
            "annotations": [anns[i] for i in rng.permutation(len(anns))]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{split}2017.json").write_text(
        json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_coco_sample(root: str | Path, n: int = 300, seed: int = 0, scene: int = 32,
                      n_val: int = 5) -> Path:
    """Write the sample (module docstring) under ``root``; -> root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    _split(root, "train", n, rng, scene)
    _split(root, "val", n_val, rng, scene)
    return root
