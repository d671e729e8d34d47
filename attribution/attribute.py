"""``attribution attribute --image IMG --prompt TEXT``: the deployed student answering a query.

One feature extraction + one head forward + one inner-product search over the saved index.  It
reads finished stage folders only (``student/deploy.py``); the soft-attribution calibrator, when
the customization benchmark fit one, is handed in by the caller.
"""

from __future__ import annotations

import struct
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from attribution import retrieval
from attribution.common.files import DataFileError, Dirs
from attribution.data.dataset import read_manifest
from attribution.data.images import center_crop_resize, save_grid
from attribution.features.cache import load_features, space_dir
from attribution.student.deploy import deployed

SHARE_POOL = 1000  # items the share of influence is normalized over (the rest count as zero)


MAX_PIXELS = 100_000_000  # larger images are refused before decoding (decompression bombs)


def read_image(path: str | Path, size: int, notices: list[str] | None = None) -> torch.Tensor:
    """A PNG/JPEG/... as float (1, 3, size, size) in [-1, 1] (center-cropped square, resized).

    Anything that is not a complete, decodable image is one :class:`DataFileError`; images that
    are valid but unusual (alpha, grayscale or palette, smaller or far larger than ``size``,
    not square) are converted, and each conversion appends a one-line notice to ``notices``."""
    path = Path(path)
    notes = [] if notices is None else notices
    if not path.is_file():
        raise DataFileError(f"query image not found: {path}")
    if path.stat().st_size == 0:
        raise DataFileError(f"query image is an empty file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise DataFileError(f"query image {path} claims {w}x{h} pixels, more than "
                                        f"the {MAX_PIXELS:,} this command decodes")
                img.load()  # decodes now: a truncated or garbled file fails here
                if "A" in img.mode or img.mode == "P" and "transparency" in img.info:
                    notes.append(f"note: {path.name} has an alpha channel; it was dropped "
                                 "(colours kept as stored)")
                elif img.mode != "RGB":
                    notes.append(f"note: {path.name} is {img.mode} (not RGB); converted to RGB")
                if w != h:
                    notes.append(f"note: {path.name} is {w}x{h}; its center square was used")
                if min(w, h) < size:
                    notes.append(f"note: {path.name} is smaller ({min(w, h)} px) than the "
                                 f"model's {size} px; upsampled")
                elif min(w, h) > 8 * size:
                    notes.append(f"note: {path.name} ({w}x{h}) was downsampled to {size}x{size}")
                return center_crop_resize(img, size)[None]
    except DataFileError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise DataFileError(f"query image is not a readable image: {path} ({err})") from err
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as err:
        raise DataFileError(f"query image cannot be decoded (truncated, corrupt or an "
                            f"unsupported kind): {path} "
                            f"({err.__class__.__name__}: {err})") from err


def _check_output(path: str | Path | None, flag: str, suffixes: tuple[str, ...],
                  image: str | Path) -> Path | None:
    """An output file name given on the command line: its folder exists, its suffix fits,
    and it is not the query image."""
    if path is None:
        return None
    path = Path(path)
    if not path.parent.is_dir():
        raise DataFileError(f"{flag} {path}: the folder {path.parent} does not exist (it is "
                            "not created for you)")
    if path.suffix.lower() not in suffixes:
        raise DataFileError(f"{flag} {path}: give a {' or '.join(suffixes)} file name")
    if path.exists() and Path(image).exists() and path.samefile(image):
        raise DataFileError(f"{flag} {path} is the query image itself: writing it would "
                            "overwrite the image; give another file name")
    return path


def write_html(page_path: Path, x: torch.Tensor, prompt: str, world, student: tuple,
               untuned: tuple, feature: str) -> None:
    """``attribute --html``: the report's gallery for one query — the student's top k and
    the untuned features' (``student``/``untuned``: (ids, scores)); no teacher ranks an
    image it has not scored, so no AP and nothing marked as shared."""
    from attribution import gallery

    files = page_path.with_name(page_path.stem + "_files")
    q = ((x[0].movedim(0, -1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    gallery.save_thumbnail(q, files / "queries" / "0.png")
    for i in list(student[0]) + list(untuned[0]):
        gallery.save_thumbnail(world.images[int(i)], files / "items" / f"{i}.png")
    methods = [gallery.Ranked(name, np.asarray([ids]),
                              _sparse(ids, scores, len(world)))
               for name, (ids, scores) in (("student", student),
                                           (f"untuned {feature}", untuned))]
    rows = gallery.gallery_rows([gallery.QueryRow(0, prompt, "query",
                                                  f"{files.name}/queries/0.png")],
                                methods, None, len(student[0]),
                                [c[0] for c in world.captions], files.name)
    page_path.write_text(gallery.page("Attribution of one query", [], rows, ["query"]))


def _sparse(ids: list[int], scores: list[float], n: int) -> np.ndarray:
    """(1, n) scores holding ``scores`` at ``ids`` (what the gallery's cells read)."""
    out = np.zeros((1, n), np.float32)
    out[0, ids] = scores
    return out


@torch.no_grad()
def attribute(cfg, dirs: Dirs, image: str | Path, prompt: str, k: int = 10,
              grid_path: str | Path | None = None, calibrator=None,
              html_path: str | Path | None = None) -> dict:
    """Top-k training items for one (image, prompt), with scores and the share of influence.

    ``dirs``: the verified folders of the world, toyclip, features and student stages.
    ``calibrator``: the soft attribution calibrated on the customization benchmark (``abc``
    stage, ``abc/calibration.py``); the share is computed over the top ``SHARE_POOL`` items of
    the index, and is absent (None) without a calibrator.

    Returns:
        {"ids": [...], "scores": [...], "captions": [...], "shares": [...] | None,
         "share_pool": int, "seconds": float}
    """
    if not isinstance(k, int) or k < 1:
        raise DataFileError(f"-k must be a positive number of training items, got {k}")
    if not str(prompt).strip():
        raise DataFileError("--prompt must not be empty: the student reads the prompt too")
    grid_path = _check_output(grid_path, "--grid", (".png", ".jpg", ".jpeg"), image)
    html_path = _check_output(html_path, "--html", (".html", ".htm"), image)
    notices: list[str] = []
    # the image is checked before any model is loaded
    x = read_image(image, read_manifest(dirs["world"])["image_size"], notices)
    d = deployed(cfg, dirs)
    world, head, index, extractor = d.world, d.head, d.index, d.extractor
    if k > int(index.ntotal):
        notices.append(f"note: -k {k} exceeds the {index.ntotal} training items; showing all")
        k = int(index.ntotal)
    start = time.perf_counter()
    raw = extractor.extract(x, [prompt])
    emb = head.embed(raw)
    n = min(int(index.ntotal), max(k, SHARE_POOL)) if calibrator is not None else k
    scores, ids = retrieval.search(index, emb.numpy(), n)
    seconds = time.perf_counter() - start
    valid = ids[0] >= 0  # approximate indexes may return fewer than n items
    shares = None if calibrator is None else (
        calibrator.probabilities(scores[0][valid])[:k].tolist())
    ids, scores = ids[0, :k].tolist(), scores[0, :k].tolist()
    if grid_path is not None:
        q = ((x[0].movedim(0, -1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        save_grid(np.stack([q] + [np.asarray(world.images[i]) for i in ids]), grid_path,
                  ncol=k + 1)
    if html_path is not None:
        items = torch.as_tensor(np.asarray(load_features(space_dir(
            dirs["features"], cfg.student.feature))["items"]), dtype=torch.float32)
        cos = (F.normalize(items, dim=-1) @ F.normalize(raw, dim=-1)[0]).numpy()
        top = np.argsort(-cos, kind="stable")[:k]
        write_html(html_path, x, prompt, world, (ids, scores),
                   (top.tolist(), cos[top].tolist()), cfg.student.feature)
    return {"ids": ids, "scores": scores, "captions": [world.captions[i][0] for i in ids],
            "shares": shares, "share_pool": n, "seconds": seconds, "notices": notices}


def format_attribution(res: dict) -> str:
    shares = res.get("shares")
    lines = list(res.get("notices", []))
    lines += [f"{'rank':>4}  {'item':>6}  {'score':>7}  " + ("share   " if shares else "")
             + "caption"]
    for r, (i, s, c) in enumerate(zip(res["ids"], res["scores"], res["captions"]), 1):
        share = f"{100 * shares[r - 1]:5.1f} %  " if shares else ""
        lines.append(f"{r:>4}  {i:>6}  {s:>7.4f}  {share}{c}")
    lines.append(f"({res['seconds'] * 1000:.1f} ms: features + head + search)")
    if shares:
        lines.append(f"share = share of influence (soft attribution calibrated on the "
                     f"customization benchmark, over the top {res['share_pool']} items); the top "
                     f"{len(shares)} hold {100 * sum(shares):.1f} %")
    else:
        lines.append("(no share-of-influence column: run `attribution abc CONFIG` to calibrate it)")
    return "\n".join(lines)
