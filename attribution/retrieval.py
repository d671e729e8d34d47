"""faiss index over embedded training items: build / search / save / load.

Embeddings are L2-normalized, so inner product = cosine and a HIGHER score = MORE influential
(the student's sign convention): retrieval is a maximum-inner-product search.

Kinds: ``flat`` (exact), ``ivf`` (IVF-Flat, ``nlist`` lists, ``nprobe`` searched), ``hnsw``
(HNSW, ``m`` links), ``ivfpq`` (IVF + product quantization, for indexes that do not fit in
memory).  ``gpu=True`` moves the index to a GPU when faiss-gpu and a GPU are present.
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
    if gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


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


def load_index(path: str | Path):
    if not Path(path).is_file():
        from attribution.data.dataset import DataFileError

        raise DataFileError(f"faiss index missing: {path}")
    return _faiss().read_index(str(path))
