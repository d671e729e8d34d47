"""User-provided image–caption data (LAION-style): a folder, or webdataset shards.

- A folder: every image (``.jpg .jpeg .png .webp``, searched recursively, sorted by path) with a
  sibling caption file of the same stem (``.txt``; one caption per line).
- Webdataset shards: a ``.tar`` file, or a text file listing ``.tar`` paths (one per line, relative
  to the list), each holding ``<key>.<image ext>`` + ``<key>.txt`` members.

Images are center-cropped to a square and resized (bicubic) to the world's ``image_size``; the
result is written in this project's world layout so every stage reads it like the toy world.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from attribution.common.files import DataFileError
from attribution.data.images import square_resize

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}


def _captions(text: str, n: int, where: str) -> list[str]:
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
    if len(lines) < n:
        raise DataFileError(f"{where} has {len(lines)} caption line(s), world.captions_per_item "
                            f"needs {n}")
    return lines[:n]


def _from_folder(root: Path, size: int, n_caps: int, limit: int | None):
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    images, caps = [], []
    for path in files[:limit]:
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise DataFileError(f"image without a caption file: {path} (expected {txt.name})")
        try:
            with Image.open(path) as img:
                images.append(square_resize(img, size))
        except (OSError, ValueError) as err:
            raise DataFileError(f"unreadable image {path}: {err}") from err
        caps.append(_captions(txt.read_text(), n_caps, str(txt)))
    return images, caps


def _from_shards(shards: list[Path], size: int, n_caps: int, limit: int | None):
    images, caps = [], []
    for shard in shards:
        if not shard.is_file():
            raise DataFileError(f"webdataset shard not found: {shard}")
        try:
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                # sample key -> its image member (one pass; the first image per key)
                image_of: dict[str, str] = {}
                for n in members:
                    if Path(n).suffix.lower() in IMAGE_EXTS:
                        image_of.setdefault(Path(n).with_suffix("").as_posix(), n)
                for key in sorted(image_of):
                    if limit is not None and len(images) >= limit:
                        return images, caps
                    img_name = image_of[key]
                    if f"{key}.txt" not in members:
                        raise DataFileError(f"{shard}: sample {key} has no .txt caption")
                    with Image.open(io.BytesIO(tar.extractfile(members[img_name]).read())) as img:
                        images.append(square_resize(img, size))
                    text = tar.extractfile(members[f"{key}.txt"]).read().decode("utf-8")
                    caps.append(_captions(text, n_caps, f"{shard}:{key}.txt"))
        except tarfile.TarError as err:
            raise DataFileError(f"webdataset shard unreadable: {shard}: {err}") from err
    return images, caps


def read_image_caption_data(source: str | Path, image_size: int, captions_per_item: int,
                            limit: int | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """(uint8 (N, S, S, 3) images, N lists of captions) from a folder or webdataset shards."""
    source = Path(source).expanduser()
    if source.is_dir():
        images, caps = _from_folder(source, image_size, captions_per_item, limit)
    elif source.suffix == ".tar":
        images, caps = _from_shards([source], image_size, captions_per_item, limit)
    elif source.is_file():
        shards = [source.parent / ln.strip() for ln in source.read_text().splitlines()
                  if ln.strip()]
        images, caps = _from_shards(shards, image_size, captions_per_item, limit)
    else:
        raise DataFileError(f"world.root not found: {source} (a folder of image + .txt pairs, "
                            f"a .tar shard, or a text file listing .tar shards)")
    if not images:
        raise DataFileError(f"no images with captions found in {source}")
    return np.stack(images).astype(np.uint8), caps
