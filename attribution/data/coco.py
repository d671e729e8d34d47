"""MSCOCO train2017 as a captioned-image set, and its pre-encoding into memory-mapped arrays.

Dataset: the images of ``captions_train2017.json`` (sorted by image id), each as a viewer shows it
(EXIF orientation applied, converted to RGB from grayscale or CMYK), center-cropped to a
square, resized to ``image_size`` (128 for the paper's generator, bicubic) and scaled to [-1, 1],
with its first ``n_captions`` (5) captions; a horizontal flip is an extra view of the item.

Pre-encoding (``encode_coco``) writes, under ``out/``::

    latents.npy         float32 (N, 2, C, h, w)  VAE posterior *sample* × scaling factor, for the
                                                 original (view 0) and the flipped image (view 1)
    text_embeddings.npy float16 (N, n_captions, L, D)  frozen text-encoder token states
    uncond.npy          float16 (L, D)  the empty prompt's token states (classifier-free guidance)
    captions.json       each item's captions, in row order (query prompts are drawn from them)
    ids.json            the COCO image ids, in row order
    progress.json       rows finished (written after each chunk is flushed): a killed run
                        resumes from there; ``manifest.json`` marks completion

Each latent's sampling noise is a function of (seed, item, view) only, so the arrays never depend
on the batch size or on where a run was resumed.  Sizes at MSCOCO scale (N = 118,287, SD-2: C = 4,
h = w = 16, L = 77, D = 1024): latents 0.97 GB, text embeddings 93 GB (float16).
``world.kind=encoded`` trains the generator and runs the teacher straight from this folder
(``attribution/data/encoded.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from attribution.common.files import DataFileError, atomic_write_bytes
from attribution.common.seeds import seeded_generator
from attribution.data.dataset import CaptionedImageSet
from attribution.data.images import center_crop_resize, square_resize


def read_coco_captions(captions_json: Path, images_dir: Path, n_captions: int
                       ) -> tuple[list[int], list[str], list[list[str]]]:
    """(ids sorted, their file names, their first ``n_captions`` captions, whitespace tidied)
    from a COCO captions file, every problem one ``DataFileError`` before any image is read:
    unreadable JSON, a missing key, duplicate image ids, an annotation for an image the file
    does not list, an image with too few captions, a listed file missing on disk.  Ids need not
    be contiguous or sorted, annotations may come in any order (kept in annotation-id order)."""
    if not captions_json.is_file():
        raise DataFileError(f"COCO captions file not found: {captions_json}")
    if not images_dir.is_dir():
        raise DataFileError(f"COCO images folder not found: {images_dir}")
    try:
        data = json.loads(captions_json.read_text(encoding="utf-8"))
        listed = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
        anns = sorted(((int(a.get("id", 0)), int(a["image_id"]), str(a["caption"]))
                       for a in data["annotations"]), key=lambda a: a[0])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataFileError(f"{captions_json} is not a COCO captions file: {err!r}") from err
    files = dict(listed)
    if len(files) != len(listed):
        seen: set[int] = set()
        dup = next(i for i, _ in listed if i in seen or seen.add(i))
        raise DataFileError(f"{captions_json}: image id {dup} is listed more than once")
    caps: dict[int, list[str]] = {i: [] for i in files}
    for ann_id, image_id, text in anns:
        if image_id not in caps:
            raise DataFileError(f"{captions_json}: annotation {ann_id} is for image id "
                                f"{image_id}, which the file's images do not list")
        if " ".join(text.split()):
            caps[image_id].append(" ".join(text.split()))
    short = [i for i in sorted(files) if len(caps[i]) < n_captions]
    if short:
        raise DataFileError(f"{captions_json}: {len(short)} image(s) have fewer than "
                            f"{n_captions} captions, e.g. image id {short[0]} has "
                            f"{len(caps[short[0]])}")
    missing = [files[i] for i in sorted(files) if not (images_dir / files[i]).is_file()]
    if missing:
        raise DataFileError(f"{len(missing)} image file(s) listed in {captions_json} are not in "
                            f"{images_dir}, e.g. {missing[0]}")
    ids = sorted(files)
    return ids, [files[i] for i in ids], [caps[i][:n_captions] for i in ids]


def open_image(path: Path) -> Image.Image:
    """A COCO image as a viewer shows it: decoded, its EXIF orientation applied, RGB (grayscale,
    CMYK and palette images converted); a file that does not decode is a ``DataFileError``."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise DataFileError(f"COCO image unreadable: {path} ({err})") from err


class CocoCaptions(Dataset):
    """COCO images + captions (see module docstring); item = {"image", "captions", "index",
    "flip", "image_id"} like :class:`attribution.data.dataset.CaptionedImageSet`'s items.
    The captions file is checked whole on construction (:func:`read_coco_captions`);
    :meth:`check_images` decodes every image once, before any model work."""

    def __init__(self, images_dir: str | Path, captions_json: str | Path, image_size: int = 128,
                 n_captions: int = 5):
        self.images_dir, self.size, self.n_captions = Path(images_dir), image_size, n_captions
        self.ids, self.files, self.captions = read_coco_captions(Path(captions_json),
                                                                 self.images_dir, n_captions)

    @classmethod
    def from_root(cls, root: str | Path, image_size: int = 128, n_captions: int = 5
                  ) -> CocoCaptions:
        """The train split of an MSCOCO 2017 folder (``annotations/captions_train2017.json``,
        ``train2017/``); a ``val2017`` split beside it is not read."""
        root = Path(root).expanduser()
        return cls(root / "train2017", root / "annotations" / "captions_train2017.json",
                   image_size, n_captions)

    def check_images(self, progress: bool = True) -> None:
        """Decode every image (JPEG draft mode: a fraction of a full decode), so a file that
        does not decode is one error naming it before any model work."""
        for name in tqdm(self.files, desc="checking COCO images", disable=not progress,
                         unit="img"):
            path = self.images_dir / name
            try:
                with Image.open(path) as img:
                    img.draft("RGB", (self.size, self.size))
                    img.load()
            except (OSError, ValueError, SyntaxError) as err:
                raise DataFileError(f"COCO image unreadable: {path} ({err}); fix or remove "
                                    "it (and its entries in the captions file)") from err

    def __len__(self) -> int:
        return len(self.ids)

    def image_tensor(self, index: int, flip: bool = False) -> torch.Tensor:
        x = center_crop_resize(open_image(self.images_dir / self.files[index]), self.size)
        return torch.flip(x, dims=[-1]) if flip else x

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def get(self, index: int, flip: bool = False) -> dict:
        return {"image": self.image_tensor(index, flip), "captions": list(self.captions[index]),
                "index": int(index), "flip": bool(flip), "image_id": self.ids[index]}


def read_coco_world(root: str | Path, image_size: int, n_captions: int, n_items: int | None,
                    progress: bool = True) -> tuple[CocoCaptions, np.ndarray]:
    """A raw MSCOCO 2017 folder as a world (``world.kind=coco``): its first ``n_items`` images by
    id (all when None), every one checked to decode before any is kept, and uint8 (N, S, S, 3)
    crops — the pixels :meth:`CocoCaptions.image_tensor` gives, so an encoding of the crops is an
    encoding of the JPEGs."""
    ds = CocoCaptions.from_root(root, image_size, n_captions)
    n = len(ds) if n_items is None else min(n_items, len(ds))
    ds.ids, ds.files, ds.captions = ds.ids[:n], ds.files[:n], ds.captions[:n]
    ds.check_images(progress)
    images = np.stack([square_resize(open_image(ds.images_dir / f), image_size)
                       for f in tqdm(ds.files, desc="reading COCO images", disable=not progress,
                                     unit="img")])
    return ds, images


class CocoWorld:
    """A ``world.kind=coco`` world folder as :func:`encode_coco` reads a dataset: the crops the
    world stage made (identical to :class:`CocoCaptions`' reading of the JPEGs), the captions,
    and the COCO ids in row order (``ids.json``); ``jpeg(i)`` is item i's original file."""

    def __init__(self, world_dir: str | Path):
        self.world = CaptionedImageSet(world_dir, verify=False)  # the pipeline verified it
        m = self.world.manifest
        if m.get("kind") != "coco":
            raise DataFileError(f"{world_dir} is not a COCO world (its manifest kind is "
                                f"{m.get('kind')!r})")
        self.ids: list[int] = json.loads((Path(world_dir) / "ids.json").read_text())
        self.files: list[str] = json.loads((Path(world_dir) / "files.json").read_text())
        self.images_dir = Path(m["source"]) / "train2017"
        self.size, self.n_captions = int(m["image_size"]), int(m["captions_per_item"])
        self.captions = self.world.captions
        if not len(self.ids) == len(self.files) == len(self.world):
            raise DataFileError(f"COCO world {world_dir}: ids.json, files.json and the images "
                                "disagree on the number of items")

    def __len__(self) -> int:
        return len(self.world)

    def image_tensor(self, index: int, flip: bool = False) -> torch.Tensor:
        return self.world.image_tensor(index, flip)

    def jpeg(self, index: int, size: int) -> torch.Tensor:
        """Item ``index`` decoded again from its original JPEG, cropped and resized to ``size``
        (float (3, size, size) in [-1, 1]): what a feature extractor with its own input size
        reads, instead of the world's ``image_size`` crop."""
        return center_crop_resize(open_image(self.images_dir / self.files[index]), size)


@torch.no_grad()
def sample_latents(vae, images: torch.Tensor, items: list[int], view: int, scale: float,
                   seed: int) -> torch.Tensor:
    """z = scale · (μ + σ·ε) of the VAE posterior, ε from (seed, item, view) alone."""
    dist = vae.encode(images).latent_dist
    eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=seeded_generator(seed, 41, i,
                                                                                   view))
                       for i in items]).to(dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * eps) * scale


def encode_coco(dataset: CocoCaptions, vae, text_encoder, out: Path, scale: float | None,
                seed: int = 0, chunk: int = 64, progress: bool = True) -> dict:
    """Write the memory-mapped latents and text embeddings (module docstring); resumable.
    ``vae=None`` stores the pixels themselves as the "latents" (the pixel codec's model space,
    ``scale`` None): a small world encoded without VAE weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    if (out / "manifest.json").is_file():
        _write_side_files(dataset, text_encoder, out)  # encodings made before they existed
        return json.loads((out / "manifest.json").read_text())
    if vae is None:
        c, h = 3, dataset.size
    else:
        c = vae.config.latent_channels
        h = dataset.size // 2 ** (len(vae.config.block_out_channels) - 1)
    lat_shape = (n, 2, c, h, h)
    txt_shape = (n, dataset.n_captions, text_encoder.max_length, text_encoder.hidden_size)
    progress_path = out / "progress.json"
    done = json.loads(progress_path.read_text())["rows"] if progress_path.is_file() else 0
    mode = "r+" if done else "w+"
    lat = np.lib.format.open_memmap(out / "latents.npy", mode=mode, dtype=np.float32,
                                    shape=lat_shape)
    txt = np.lib.format.open_memmap(out / "text_embeddings.npy", mode=mode, dtype=np.float16,
                                    shape=txt_shape)
    if lat.shape != lat_shape or txt.shape != txt_shape:
        raise DataFileError(f"partial encoding in {out} has other shapes than this dataset: "
                            "delete the folder to start over")
    device = next(vae.parameters()).device if vae is not None else torch.device("cpu")
    bar = tqdm(total=n, initial=done, desc="encoding COCO", disable=not progress, unit="img")
    for start in range(done, n, chunk):
        rows = list(range(start, min(start + chunk, n)))
        for view in (0, 1):
            x = torch.stack([dataset.image_tensor(i, flip=bool(view)) for i in rows]).to(device)
            z = x if vae is None else sample_latents(vae, x, rows, view, scale, seed)
            lat[start : start + len(rows), view] = z.float().cpu().numpy()
        texts = [t for i in rows for t in dataset.captions[i]]
        emb = text_encoder.encode(texts).view(len(rows), dataset.n_captions,
                                              *txt_shape[2:])
        if not torch.isfinite(emb).all():
            raise FloatingPointError(f"non-finite text embeddings for rows {rows[0]}..{rows[-1]}")
        txt[start : start + len(rows)] = emb.numpy().astype(np.float16)
        lat.flush()
        txt.flush()
        atomic_write_bytes(progress_path, json.dumps({"rows": rows[-1] + 1}).encode())
        bar.update(len(rows))
    bar.close()
    _write_side_files(dataset, text_encoder, out)
    manifest = {"n_items": n, "latents": list(lat_shape), "text_embeddings": list(txt_shape),
                "scale": scale, "codec": "pixel" if vae is None else "vae", "seed": seed,
                "image_size": dataset.size,
                "text_encoder": text_encoder.source}
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def _write_side_files(dataset: CocoCaptions, text_encoder, out: Path) -> None:
    """ids.json, captions.json and uncond.npy (each written once, atomically)."""
    from attribution.common.files import atomic_save_npy

    if not (out / "ids.json").is_file():
        atomic_write_bytes(out / "ids.json", json.dumps(dataset.ids).encode())
    if not (out / "captions.json").is_file():
        atomic_write_bytes(out / "captions.json",
                           json.dumps([list(c) for c in dataset.captions]).encode())
    if not (out / "uncond.npy").is_file():
        atomic_save_npy(out / "uncond.npy", text_encoder.encode([""])[0].numpy().astype(np.float16))
