"""``attribution attribute --image IMG --prompt TEXT``: the deployed student answering a query.

One feature extraction + one head forward + one inner-product search over the saved index.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attribution import retrieval
from attribution.data.dataset import CaptionedImageSet, DataFileError
from attribution.data.images import save_grid
from attribution.features.extractors import build_extractor
from attribution.student.head import EmbeddingHead


def load_head(student_dir: Path) -> EmbeddingHead:
    meta_path, weights = Path(student_dir) / "head.json", Path(student_dir) / "head.pt"
    if not meta_path.is_file() or not weights.is_file():
        raise DataFileError(f"trained student missing in {student_dir} (head.json, head.pt): "
                            "run the student stage first")
    meta = json.loads(meta_path.read_text())
    head = EmbeddingHead(meta["dims"], meta["dropout"], meta["layernorm"])
    head.load_state_dict(torch.load(weights, map_location="cpu"))
    return head.eval()


def deployed(pipe):
    """What answering a query needs: (world, head, faiss index, feature extractor)."""
    world = CaptionedImageSet(pipe.dir("world"), verify=False)
    head = load_head(pipe.dir("student"))
    index = retrieval.load_index(pipe.dir("student") / "index.faiss")
    cfg = pipe.cfg
    extractor = build_extractor(cfg.student.feature,
                                pipe.feature_context(world.manifest["image_size"]),
                                cfg.features.l2_per_block).eval()
    return world, head, index, extractor


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """A PNG/JPEG as float (1, 3, size, size) in [-1, 1] (center-cropped square, resized)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"query image not found: {path}")
    img = Image.open(path).convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).float().movedim(-1, 0)[None] / 127.5 - 1


@torch.no_grad()
def attribute(pipe, image: str | Path, prompt: str, k: int = 10,
              grid_path: str | Path | None = None) -> dict:
    """Top-k training items for one (image, prompt), with scores and the share of influence.

    Returns:
        {"ids": [...], "scores": [...], "captions": [...], "seconds": float}
    """
    world, head, index, extractor = deployed(pipe)
    x = read_image(image, world.manifest["image_size"])
    start = time.perf_counter()
    emb = head.embed(extractor.extract(x, [prompt]))
    scores, ids = retrieval.search(index, emb.numpy(), k)
    seconds = time.perf_counter() - start
    ids, scores = ids[0].tolist(), scores[0].tolist()
    if grid_path is not None:
        q = ((x[0].movedim(0, -1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        save_grid(np.stack([q] + [np.asarray(world.images[i]) for i in ids]), grid_path,
                  ncol=k + 1)
    return {"ids": ids, "scores": scores, "captions": [world.captions[i][0] for i in ids],
            "seconds": seconds}


def format_attribution(res: dict) -> str:
    lines = [f"{'rank':>4}  {'item':>6}  {'score':>7}  caption"]
    for r, (i, s, c) in enumerate(zip(res["ids"], res["scores"], res["captions"]), 1):
        lines.append(f"{r:>4}  {i:>6}  {s:>7.4f}  {c}")
    lines.append(f"({res['seconds'] * 1000:.1f} ms: features + head + search)")
    return "\n".join(lines)


@torch.no_grad()
def end_to_end_throughput(pipe, n_queries: int = 30, k: int = 10, warmup: int = 3) -> dict:
    """Queries/s for single queries, end to end (image + prompt -> features -> head -> search),
    timed after warm-up over the test query images; and the search alone on the same index."""
    from attribution.data.queries import QuerySet

    _, head, index, extractor = deployed(pipe)
    qs = QuerySet(pipe.dir("queries") / "query_test")
    n = min(n_queries, len(qs))
    images = [torch.from_numpy(qs.image(i)).float().movedim(-1, 0)[None] / 127.5 - 1
              for i in range(n)]

    def one(i):
        emb = head.embed(extractor.extract(images[i], [qs.captions[i]]))
        return retrieval.search(index, emb.numpy(), k), emb

    for i in range(min(warmup, n)):
        one(i)
    start = time.perf_counter()
    embs = [one(i)[1].numpy() for i in range(n)]
    e2e = time.perf_counter() - start
    start = time.perf_counter()
    for e in embs:
        retrieval.search(index, e, k)
    search = time.perf_counter() - start
    return {"queries_per_second": n / e2e, "search_queries_per_second": n / search,
            "n_items": int(index.ntotal), "index": type(index).__name__, "batch_size": 1}
