"""Search benchmark: exact and approximate faiss indexes over synthetic 768-d items.

Usage:  python benchmarks/search_bench.py [--sizes 10000 100000 1000000] [--dim 768]
                                          [--kinds flat ivf hnsw ivfpq ivfpq+rerank] [--k 10]
                                          [--rerank 1000]

For each N and index kind: build time, single-query (batch 1) and batched (batch 256) queries/s,
recall@k of the approximate index against the exact one, and how close to the hardware it runs:
a single exact query streams N x D floats, so its rate is compared with this machine's measured
memory bandwidth; a batch of exact queries is one (Q x D) @ (D x N) product, compared with this
machine's measured matrix-multiply peak.  Items are unit vectors drawn around 1,000 random
centres (clustered like real embeddings, so IVF partitions mean something); queries are fresh
draws from the same mixture.  HNSW at 10^6 takes long to build on 2 cores: `--hnsw-max`.
``ivfpq+rerank`` is IVF-PQ proposing ``--rerank`` candidates that are re-scored exactly from
float16 vectors memory-mapped from a file (retrieval.Reranked); its size column adds that file.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch
from _common import gemm_gflops

from attribution import retrieval


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, centres: np.ndarray, rng: np.random.Generator,
              chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        c = centres[rng.integers(0, len(centres), m)]
        out[s : s + m] = unit(c + 0.35 * rng.standard_normal((m, d), dtype=np.float32)
                              / np.sqrt(d))
    return out


def memory_bandwidth_gbs(mb: int = 1024, reps: int = 5) -> float:
    """Read bandwidth: sum over a buffer far larger than the caches (best of ``reps``)."""
    a = np.ones(mb * 1024 * 1024 // 4, np.float32)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best / 1e9


def rate(index, queries: np.ndarray, k: int, batch: int, min_seconds: float = 1.0) -> float:
    """Queries/s at a given batch size, repeated for at least ``min_seconds``."""
    retrieval.search(index, queries[:batch], k)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or done == 0:
        for s in range(0, len(queries), batch):
            retrieval.search(index, queries[s : s + batch], k)
            done += min(batch, len(queries) - s)
            if batch == 1 and time.perf_counter() - start > min_seconds:
                break
    return done / (time.perf_counter() - start)


def recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx_ids, exact_ids)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--kinds", nargs="+",
                    default=["flat", "ivf", "hnsw", "ivfpq", "ivfpq+rerank"])
    ap.add_argument("--rerank", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="skip HNSW above this N")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    d = args.dim
    centres = unit(rng.standard_normal((1000, d), dtype=np.float32))
    bw, peak = memory_bandwidth_gbs(), gemm_gflops(2048, 2048, 2048)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, faiss {retrieval._faiss().__version__}")
    print(f"measured: memory read bandwidth {bw:.1f} GB/s, fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"items: unit vectors, d={d}, clustered; k={args.k}; batch={args.batch}")
    head = (f"{'N':>9} {'index':<12} {'build s':>8} {'q/s b=1':>9} {'%BW':>5} "
            f"{'q/s b=' + str(args.batch):>10} {'%peak':>6} {'recall@k':>9} {'MB':>8}")
    print(head)
    queries = clustered(args.queries, d, centres, rng)
    for n in args.sizes:
        items = clustered(n, d, centres, rng)
        exact_ids = None
        for kind in args.kinds:
            if kind == "hnsw" and n > args.hnsw_max:
                print(f"{n:>9} {kind:<12} skipped (--hnsw-max {args.hnsw_max})")
                continue
            opts = {"nlist": min(int(4 * np.sqrt(n)), 1024), "nprobe": 16, "pq_m": 64}
            t = time.perf_counter()
            index = retrieval.build_index(items, kind.split("+")[0], **opts)
            extra_mb = 0.0
            if kind.endswith("+rerank"):
                path = os.path.join(tempfile.mkdtemp(), "vectors.npy")
                retrieval.save_rerank_vectors(items, path)
                extra_mb = os.path.getsize(path) / 1e6
                index = retrieval.Reranked(index, np.load(path, mmap_mode="r"), args.rerank)
            build = time.perf_counter() - t
            single = rate(index, queries[:64], args.k, 1)
            batched = rate(index, queries, args.k, args.batch)
            _, ids = retrieval.search(index, queries, args.k)
            if kind == "flat":
                exact_ids = ids
            rec = recall(ids, exact_ids) if exact_ids is not None else float("nan")
            faiss_index = index.index if isinstance(index, retrieval.Reranked) else index
            size_mb = retrieval._faiss().serialize_index(faiss_index).nbytes / 1e6 + extra_mb
            bw_frac = pct_peak = ""
            if kind == "flat":  # what exact search must move / compute
                bw_frac = f"{100 * single * n * d * 4 / 1e9 / bw:.0f}"
                pct_peak = f"{100 * batched * 2 * n * d / 1e9 / peak:.0f}"
            print(f"{n:>9} {kind:<12} {build:>8.2f} {single:>9.1f} {bw_frac:>5} "
                  f"{batched:>10.1f} {pct_peak:>6} {rec:>9.3f} {size_mb:>8.1f}", flush=True)
        del items


if __name__ == "__main__":
    main()
