"""faiss index over embedded training items: build / search / save / load.

Embeddings are L2-normalized, so inner product = cosine and a HIGHER score = MORE influential
(the student's sign convention): retrieval is a maximum-inner-product search.

Kinds: ``flat`` (exact), ``ivf`` (IVF-Flat, ``nlist`` lists, ``nprobe`` searched), ``hnsw``
(HNSW, ``m`` links), ``ivfpq`` (IVF + product quantization, for indexes that do not fit in
memory).  ``gpu=True`` puts the index on GPU 0 (faiss-gpu; the caller decides from the
config's device, ``common.devices.faiss_on_gpu``); saved indexes are always the CPU form.

:class:`Reranked` puts an exact second pass behind an approximate index: the index proposes the
top ``candidates`` and their full vectors (float16, memory-mapped from disk for indexes larger
than memory) re-score them exactly.  IVF-PQ alone has poor recall at k = 10 (compressed codes);
with re-ranking it is as good as its candidate list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _faiss():
    import faiss

    return faiss


def build_index(emb: np.ndarray, kind: str = "flat", nlist: int = 64, nprobe: int = 8,
                m: int = 32, pq_m: int = 16, gpu: bool = False, seed: int = 0):
    """Index float32 (N, D) embeddings for inner-product search."""
    faiss = _faiss()
    x = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = x.shape
    if not np.isfinite(x).all():
        raise FloatingPointError("cannot index non-finite embeddings")
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind in ("ivf", "ivfpq"):
        nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants ~39 training points per list
        quant = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if d % pq_m:
                raise ValueError(f"ivfpq needs the dimension {d} divisible by pq_m={pq_m}")
            index = faiss.IndexIVFPQ(quant, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = nprobe
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index kind {kind!r} (flat | ivf | ivfpq | hnsw)")
    index.add(x)
    return to_gpu(index) if gpu else index


def to_gpu(index):
    """The index on GPU 0 (the caller checked that faiss has GPU support and a GPU:
    ``common.devices.faiss_on_gpu``); HNSW has no GPU form in faiss and stays."""
    faiss = _faiss()
    if type(index).__name__.startswith("IndexHNSW"):
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


class Reranked:
    """An approximate index whose top ``candidates`` are re-scored exactly from ``vectors``
    (any (N, D) array-like, e.g. a float16 memmap); same ``search``/``ntotal``/``d`` surface."""

    def __init__(self, index, vectors, candidates: int = 1000):
        if len(vectors) != index.ntotal:
            raise ValueError(f"{len(vectors)} re-ranking vectors for an index of {index.ntotal}")
        self.index, self.vectors, self.candidates = index, vectors, candidates
        self.ntotal, self.d = index.ntotal, index.d

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, cand = self.index.search(q, min(max(k, self.candidates), self.ntotal))
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            c = cand[r][cand[r] >= 0]
            order = np.sort(c)  # sorted reads: sequential on a memmap
            exact = np.asarray(self.vectors[order], dtype=np.float32) @ q[r]
            top = np.argsort(-exact, kind="stable")[:k]
            scores[r, : len(top)], ids[r, : len(top)] = exact[top], order[top]
        return scores, ids


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 (Q, k), ids int64 (Q, k)), best first."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    scores, ids = index.search(q, min(k, index.ntotal))
    return scores, ids.astype(np.int64)


def save_index(index, path: str | Path) -> None:
    faiss = _faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))


def save_rerank_vectors(emb: np.ndarray, path: str | Path) -> None:
    """The full vectors a :class:`Reranked` index re-scores with (float16: half the bytes)."""
    np.save(path, np.asarray(emb, dtype=np.float16))


def load_index(path: str | Path, rerank: int = 0, gpu: bool = False):
    """Load an index (onto the GPU with ``gpu``); with ``rerank`` > 0 and ``<path stem>.vectors
    .npy`` beside it, wrap it in :class:`Reranked` over those vectors (memory-mapped)."""
    from attribution.common.files import DataFileError, load_npy

    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"faiss index missing: {path}")
    try:
        index = _faiss().read_index(str(path))
    except RuntimeError as err:  # faiss reports a truncated or foreign file this way
        raise DataFileError(f"faiss index is corrupt: {path} ({str(err).splitlines()[0]}). "
                            "To rebuild it, rerun `attribution student CONFIG` (delete the "
                            "student folder first)") from err
    if gpu:
        index = to_gpu(index)
    vectors = path.with_suffix(".vectors.npy")
    if rerank > 0 and vectors.is_file():
        return Reranked(index, load_npy(vectors, "Re-ranking vectors", mmap=True), rerank)
    return index
