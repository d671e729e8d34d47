"""``attribution attribute --image IMG --prompt TEXT``: the deployed student answering a query.

One feature extraction + one head forward + one inner-product search over the saved index.
"""

from __future__ import annotations

import struct
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from attribution import retrieval
from attribution.common.files import DataFileError, load_weights, read_json
from attribution.data.dataset import CaptionedImageSet, read_manifest
from attribution.data.images import center_crop_resize, save_grid
from attribution.features.extractors import build_extractor
from attribution.student.head import EmbeddingHead

SHARE_POOL = 1000  # items the share of influence is normalized over (the rest count as zero)


def load_head(student_dir: Path) -> EmbeddingHead:
    meta_path, weights = Path(student_dir) / "head.json", Path(student_dir) / "head.pt"
    if not meta_path.is_file() or not weights.is_file():
        raise DataFileError(f"trained student missing in {student_dir} (head.json, head.pt): "
                            "run the student stage first")
    hint = "rerun `attribution student CONFIG` (delete the folder first)"
    meta = read_json(meta_path, "student head description", hint)
    state = load_weights(weights, "student head weights", hint)
    try:
        head = EmbeddingHead(meta["dims"], meta["dropout"], meta["layernorm"],
                             kind=meta.get("kind", "mlp"))
        head.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise DataFileError(f"student head files in {student_dir} do not fit together ({err}). "
                            f"To rebuild them, {hint}.") from err
    return head.eval()


def deployed(pipe):
    """What answering a query needs: (world, head, faiss index, feature extractor); every
    stage file it reads is verified against its stage's record first."""
    for stage in ("world", "toyclip", "features", "student"):
        pipe.finished(stage)  # verifies a finished stage's files (the student's own stage
        # measures its throughput with this before it has finished)
    world = CaptionedImageSet(pipe.dir("world"), verify=False)
    head = load_head(pipe.dir("student"))
    index = retrieval.load_index(pipe.dir("student") / "index.faiss", pipe.cfg.student.rerank)
    cfg = pipe.cfg
    extractor = build_extractor(cfg.student.feature,
                                pipe.feature_context(world.manifest["image_size"]),
                                cfg.features.l2_per_block).eval()
    return world, head, index, extractor


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


@torch.no_grad()
def attribute(pipe, image: str | Path, prompt: str, k: int = 10,
              grid_path: str | Path | None = None) -> dict:
    """Top-k training items for one (image, prompt), with scores and the share of influence.

    The share is the soft attribution calibrated on the customization benchmark (``abc`` stage,
    ``abc/calibration.py``) over the top ``SHARE_POOL`` items of the index; absent (None) when
    that stage has not run for this config.

    Returns:
        {"ids": [...], "scores": [...], "captions": [...], "shares": [...] | None,
         "share_pool": int, "seconds": float}
    """
    from attribution.abc.benchmark import load_calibrator

    if not isinstance(k, int) or k < 1:
        raise DataFileError(f"-k must be a positive number of training items, got {k}")
    if not str(prompt).strip():
        raise DataFileError("--prompt must not be empty: the student reads the prompt too")
    if grid_path is not None:
        grid_path = Path(grid_path)
        if not grid_path.parent.is_dir():
            raise DataFileError(f"--grid {grid_path}: the folder {grid_path.parent} does not "
                                "exist (it is not created for you)")
        if grid_path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            raise DataFileError(f"--grid {grid_path}: give a .png (or .jpg) file name")
    notices: list[str] = []
    pipe.verified_dir("student")  # a deployed student is a finished one
    # the image is checked before any model is loaded
    x = read_image(image, read_manifest(pipe.verified_dir("world"))["image_size"], notices)
    world, head, index, extractor = deployed(pipe)
    if k > int(index.ntotal):
        notices.append(f"note: -k {k} exceeds the {index.ntotal} training items; showing all")
        k = int(index.ntotal)
    calibrator = load_calibrator(pipe, "student")
    start = time.perf_counter()
    emb = head.embed(extractor.extract(x, [prompt]))
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


@torch.no_grad()
def student_test_ranks(pipe) -> np.ndarray:
    """The trained student's ranking of every training item for each test query: int (Q, N)."""
    from attribution.features.cache import load_features
    from attribution.student.train import space_dir

    head = load_head(pipe.dir("student"))
    feats = load_features(space_dir(pipe.dir("features"), pipe.cfg.student.feature))
    qe = head.embed(torch.as_tensor(np.array(feats["query_test"]), dtype=torch.float32))
    ie = head.embed(torch.as_tensor(np.array(feats["items"]), dtype=torch.float32))
    return np.argsort(-(qe @ ie.T).numpy(), axis=1, kind="stable")


def _test_images(pipe, n_queries: int):
    from attribution.data.queries import QuerySet

    qs = QuerySet(pipe.dir("queries") / "query_test")
    n = min(n_queries, len(qs))
    images = [torch.from_numpy(qs.image(i)).float().movedim(-1, 0)[None] / 127.5 - 1
              for i in range(n)]
    return images, qs.captions[:n]


def _rate(fn, n: int, warmup: int) -> float:
    """Calls/s of ``fn(i)`` for i < n, after ``warmup`` untimed calls."""
    for i in range(min(warmup, n)):
        fn(i)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


@torch.no_grad()
def feature_search_throughput(pipe, space: str, n_queries: int = 30, k: int = 10,
                              warmup: int = 3, extractor=None) -> dict:
    """The untuned baseline deployed: features -> flat cosine search over the raw item
    features (no head); queries/s at batch 1 and the index's storage.  ``extractor``: the
    space's extractor when the caller already built it."""
    from attribution.features.cache import load_features
    from attribution.student.train import space_dir

    if extractor is None:
        world = CaptionedImageSet(pipe.dir("world"), verify=False)
        extractor = build_extractor(space, pipe.feature_context(world.manifest["image_size"]),
                                    pipe.cfg.features.l2_per_block).eval()
    items = np.asarray(load_features(space_dir(pipe.dir("features"), space))["items"],
                       dtype=np.float32)
    items = items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)
    index = retrieval.build_index(items, "flat")
    images, captions = _test_images(pipe, n_queries)

    def one(i):
        f = extractor.extract(images[i], [captions[i]]).numpy()
        return retrieval.search(index, f / max(float(np.linalg.norm(f)), 1e-12), k)

    return {"queries_per_second": _rate(one, len(images), warmup),
            "storage_bytes": int(items.size) * 4}


@torch.no_grad()
def end_to_end_throughput(pipe, n_queries: int = 30, k: int = 10, warmup: int = 3) -> dict:
    """Queries/s for single queries, end to end (image + prompt -> features -> head -> search),
    timed after warm-up over the test query images; the search alone on the same index; and the
    untuned baseline (features -> flat cosine search, no head) on the same queries.  Storage is
    what a deployment keeps per method: the index of embeddings (student) or of raw features."""
    _, head, index, extractor = deployed(pipe)
    images, captions = _test_images(pipe, n_queries)
    n = len(images)

    def student(i):
        return head.embed(extractor.extract(images[i], [captions[i]])).numpy()

    qps = _rate(lambda i: retrieval.search(index, student(i), k), n, warmup)
    embs = [student(i) for i in range(n)]
    search = _rate(lambda i: retrieval.search(index, embs[i], k), n, warmup)
    base = feature_search_throughput(pipe, pipe.cfg.student.feature, n_queries, k, warmup,
                                     extractor)
    return {"queries_per_second": qps, "search_queries_per_second": search,
            "baseline_queries_per_second": base["queries_per_second"],
            "storage_bytes": int(index.ntotal) * int(index.d) * 4,
            "baseline_storage_bytes": base["storage_bytes"],
            "n_items": int(index.ntotal), "index": type(index).__name__, "batch_size": 1}
