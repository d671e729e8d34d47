"""The deployed student, read from finished stage folders: head, index, extractor, rankings and
their throughput.

Everything here is a function of the config and the stage folders it names (``dirs`` maps a
stage name to its folder: ``world``, ``toyclip``, ``features``, ``queries``, ``student``).  The
caller verifies those folders first (the pipeline checks every finished stage's files against its
record); nothing here knows the pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attribution import retrieval
from attribution.common.devices import faiss_on_gpu
from attribution.common.files import DataFileError, Dirs, load_weights, read_json
from attribution.data.dataset import CaptionedImageSet
from attribution.data.queries import QuerySet
from attribution.features.cache import load_features, space_dir
from attribution.features.extractors import build_extractor, feature_context
from attribution.student.head import EmbeddingHead


def load_head(student_dir: Path) -> EmbeddingHead:
    """The trained head of a student stage folder (``head.json`` + ``head.pt``), in eval mode."""
    meta_path, weights = Path(student_dir) / "head.json", Path(student_dir) / "head.pt"
    if not meta_path.is_file() or not weights.is_file():
        raise DataFileError(f"trained student missing in {student_dir} (head.json, head.pt): "
                            "run the student stage first")
    hint = "rerun `attribution student CONFIG` (delete the folder first)"
    meta = read_json(meta_path, "student head description", hint)
    state = load_weights(weights, "student head weights", hint)
    try:
        head = EmbeddingHead(meta["dims"], meta["dropout"], meta["layernorm"],
                             kind=meta.get("kind", "mlp"), whiten=meta.get("whiten", 0) > 0)
        head.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise DataFileError(f"student head files in {student_dir} do not fit together ({err}). "
                            f"To rebuild them, {hint}.") from err
    return head.eval()


@dataclass
class Deployed:
    """What answering a query needs."""

    world: CaptionedImageSet
    head: EmbeddingHead
    index: object  # a faiss index (retrieval.load_index)
    extractor: torch.nn.Module


def extractor_for(cfg, dirs: Dirs, space: str, image_size: int):
    """The feature extractor of ``space`` as the features stage built it (eval mode)."""
    ctx = feature_context(cfg.features, dirs["toyclip"], image_size)
    return build_extractor(space, ctx, cfg.features.l2_per_block).eval()


def deployed(cfg, dirs: Dirs) -> Deployed:
    """The deployed student of these (verified) folders."""
    world = CaptionedImageSet(dirs["world"], verify=False)
    head = load_head(dirs["student"])
    index = retrieval.load_index(Path(dirs["student"]) / "index.faiss", cfg.student.rerank,
                                 gpu=faiss_on_gpu(cfg.device))
    extractor = extractor_for(cfg, dirs, cfg.student.feature, world.manifest["image_size"])
    return Deployed(world, head, index, extractor)


@torch.no_grad()
def student_test_scores(cfg, features_dir: Path, student_dir: Path) -> np.ndarray:
    """The trained student's score (cosine in its embedding) of every training item for each
    test query: float (Q, N), higher = more influential."""
    head = load_head(student_dir)
    feats = load_features(space_dir(features_dir, cfg.student.feature))
    qe = head.embed(torch.as_tensor(np.array(feats["query_test"]), dtype=torch.float32))
    ie = head.embed(torch.as_tensor(np.array(feats["items"]), dtype=torch.float32))
    return (qe @ ie.T).numpy()


def student_test_ranks(cfg, features_dir: Path, student_dir: Path) -> np.ndarray:
    """The trained student's ranking of every training item for each test query: int (Q, N)."""
    return np.argsort(-student_test_scores(cfg, features_dir, student_dir), axis=1,
                      kind="stable")


def test_images(queries_dir: Path, n_queries: int) -> tuple[list[torch.Tensor], list[str]]:
    """The first ``n_queries`` test query images as float (1, 3, H, W) in [-1, 1], and prompts."""
    qs = QuerySet(Path(queries_dir) / "query_test")
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
def feature_search_throughput(cfg, dirs: Dirs, space: str, n_queries: int = 30, k: int = 10,
                              warmup: int = 3, extractor=None, transform=None) -> dict:
    """The untuned baseline deployed: features -> flat cosine search over the raw item
    features (no head); queries/s at batch 1 and the index's storage.  ``extractor``: the
    space's extractor when the caller already built it; ``transform``: a fixed map of the
    features (float (B, D) -> (B, D'), numpy) applied to items and queries before the cosine,
    e.g. the student's whitening (the whitened baseline); its cost is timed with the query."""
    if extractor is None:
        world = CaptionedImageSet(dirs["world"], verify=False)
        extractor = extractor_for(cfg, dirs, space, world.manifest["image_size"])
    items = np.asarray(load_features(space_dir(dirs["features"], space))["items"],
                       dtype=np.float32)
    if transform is not None:
        items = np.asarray(transform(items), dtype=np.float32)
    items = items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)
    index = retrieval.build_index(items, "flat")
    images, captions = test_images(dirs["queries"], n_queries)

    def one(i):
        f = extractor.extract(images[i], [captions[i]]).numpy()
        if transform is not None:
            f = np.asarray(transform(f), dtype=np.float32)
        return retrieval.search(index, f / max(float(np.linalg.norm(f)), 1e-12), k)

    return {"queries_per_second": _rate(one, len(images), warmup),
            "storage_bytes": int(items.size) * 4}


@torch.no_grad()
def end_to_end_throughput(cfg, dirs: Dirs, n_queries: int = 30, k: int = 10,
                          warmup: int = 3) -> dict:
    """Queries/s for single queries, end to end (image + prompt -> features -> head -> search),
    timed after warm-up over the test query images; the search alone on the same index; and the
    untuned baseline (features -> flat cosine search, no head) on the same queries.  Storage is
    what a deployment keeps per method: the index of embeddings (student) or of raw features."""
    d = deployed(cfg, dirs)
    images, captions = test_images(dirs["queries"], n_queries)
    n = len(images)

    def student(i):
        return d.head.embed(d.extractor.extract(images[i], [captions[i]])).numpy()

    qps = _rate(lambda i: retrieval.search(d.index, student(i), k), n, warmup)
    embs = [student(i) for i in range(n)]
    search = _rate(lambda i: retrieval.search(d.index, embs[i], k), n, warmup)
    base = feature_search_throughput(cfg, dirs, cfg.student.feature, n_queries, k, warmup,
                                     d.extractor)
    return {"queries_per_second": qps, "search_queries_per_second": search,
            "baseline_queries_per_second": base["queries_per_second"],
            "storage_bytes": int(d.index.ntotal) * int(d.index.d) * 4,
            "baseline_storage_bytes": base["storage_bytes"],
            "n_items": int(d.index.ntotal), "index": type(d.index).__name__, "batch_size": 1}
