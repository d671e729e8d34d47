"""MSCOCO train2017 as a captioned-image set, and its pre-encoding into memory-mapped arrays.

Dataset: the images of ``captions_train2017.json`` (sorted by image id), each center-cropped to a
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
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from attribution.common.files import DataFileError, atomic_write_bytes
from attribution.common.seeds import seeded_generator
from attribution.data.images import center_crop_resize


class CocoCaptions(Dataset):
    """COCO images + captions (see module docstring); item = {"image", "captions", "index",
    "flip", "image_id"} like :class:`attribution.data.dataset.CaptionedImageSet`'s items."""

    def __init__(self, images_dir: str | Path, captions_json: str | Path, image_size: int = 128,
                 n_captions: int = 5):
        self.images_dir, self.size, self.n_captions = Path(images_dir), image_size, n_captions
        path = Path(captions_json)
        if not path.is_file():
            raise DataFileError(f"COCO captions file not found: {path}")
        if not self.images_dir.is_dir():
            raise DataFileError(f"COCO images folder not found: {self.images_dir}")
        try:
            data = json.loads(path.read_text())
            files = {im["id"]: im["file_name"] for im in data["images"]}
            caps: dict[int, list[str]] = {}
            for ann in sorted(data["annotations"], key=lambda a: a.get("id", 0)):
                caps.setdefault(ann["image_id"], []).append(" ".join(ann["caption"].split()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataFileError(f"{path} is not a COCO captions file: {err}") from err
        short = [i for i in files if len(caps.get(i, [])) < n_captions]
        if short:
            raise DataFileError(f"{len(short)} COCO images have fewer than {n_captions} "
                                f"captions, e.g. image id {short[0]}")
        self.ids = sorted(files)
        self.files = [files[i] for i in self.ids]
        self.captions = [caps[i][:n_captions] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def image_tensor(self, index: int, flip: bool = False) -> torch.Tensor:
        path = self.images_dir / self.files[index]
        try:
            with Image.open(path) as img:
                x = center_crop_resize(img, self.size)
        except (OSError, ValueError) as err:
            raise DataFileError(f"COCO image unreadable: {path} ({err})") from err
        return torch.flip(x, dims=[-1]) if flip else x

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def get(self, index: int, flip: bool = False) -> dict:
        return {"image": self.image_tensor(index, flip), "captions": list(self.captions[index]),
                "index": int(index), "flip": bool(flip), "image_id": self.ids[index]}


@torch.no_grad()
def sample_latents(vae, images: torch.Tensor, items: list[int], view: int, scale: float,
                   seed: int) -> torch.Tensor:
    """z = scale · (μ + σ·ε) of the VAE posterior, ε from (seed, item, view) alone."""
    dist = vae.encode(images).latent_dist
    eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=seeded_generator(seed, 41, i,
                                                                                   view))
                       for i in items]).to(dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * eps) * scale


def encode_coco(dataset: CocoCaptions, vae, text_encoder, out: Path, scale: float,
                seed: int = 0, chunk: int = 64, progress: bool = True) -> dict:
    """Write the memory-mapped latents and text embeddings (module docstring); resumable."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    if (out / "manifest.json").is_file():
        _write_side_files(dataset, text_encoder, out)  # encodings made before they existed
        return json.loads((out / "manifest.json").read_text())
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    c, h = vae.config.latent_channels, dataset.size // down
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
    device = next(vae.parameters()).device
    bar = tqdm(total=n, initial=done, desc="encoding COCO", disable=not progress, unit="img")
    for start in range(done, n, chunk):
        rows = list(range(start, min(start + chunk, n)))
        for view in (0, 1):
            x = torch.stack([dataset.image_tensor(i, flip=bool(view)) for i in rows]).to(device)
            lat[start : start + len(rows), view] = sample_latents(vae, x, rows, view, scale,
                                                                  seed).float().cpu().numpy()
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
                "scale": scale, "seed": seed, "image_size": dataset.size,
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
