"""Recovery benchmark: can the student learn a teacher whose influence is a KNOWN function?

Usage:  python benchmarks/student_recovery.py [--maps linear nonlinear ignored]
            [--heads default linear mlp:768x4 residual:768] [--losses default ce mse]
            [--out runs/recovery] [--set key=value ...]

For each hidden map it writes a synthetic set in the exact released layout (docs/method.md §6;
``attribution/data/released.py``) and trains the student through the real command,
``attribution run configs/experiment/coco_released.yaml data.root=<set> ...``, once per head
kind and loss asked for ("default" = what the config ships).  Sizes (defaults): N = 20,000
items, 1,280-d features, 1,000 training queries x K = 1,000 stage-1 candidates, 50 test
queries; mAP@100 over the whole set (0.5 % of N, as 500 of MSCOCO's 118k is 0.4 %).

The world.  Features f = B z + e (z: 48-d latent; e: isotropic noise, 1/5 of the signal's energy).  The teacher's influence
of item j on query q is  cos(h(f_q), h(f_j)) + sigma * noise, for a hidden map h:
  linear     h = M f, M = W B+ (a rotation and weights in [0.5, 2] of the latent directions);
  nonlinear  h = centred ReLU(A M f + b), 256 random units with biases: a one-hidden-layer
             network of the linear code (an MLP can represent it, a linear head cannot);
  ignored    f gains 64 low-variance dimensions v (scale 0.15: raw cosine barely sees them)
             and h = [M f_main, 0.6 v]: the influence leans on what stage 1 ignores.
Stage-1 K-sets are the K nearest items by raw cosine (as the reference curates by feature
similarity); training rankings order them by the noisy influence; test rankings are full-set
and noisy.  Three reference rankings of the test queries come with every set:
  raw      cosine of f (the untuned features: the floor);
  oracle   the noise-free influence (the ceiling: the teacher's noise is all that stops it);
  student  the trained head;  gap closed = (student - raw) / (oracle - raw).
CPU seconds are the child process's user+system time (dataloader workers included).

The sets are cached under --out (keyed by their parameters); runs are cached by the pipeline
(rerunning prints the stored figures).  Nothing here is a test: it prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPACE = "dino+clip_text"
MAPS = ("linear", "nonlinear", "ignored")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _topk_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the k largest scores per row, best first (ties by id)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


class HiddenWorld:
    """Features and the noise-free influence code h(f) of one hidden map (deterministic in
    ``seed``)."""

    def __init__(self, kind: str, dim: int, seed: int, latent: int = 48, extra: int = 64):
        if kind not in MAPS:
            raise ValueError(f"unknown hidden map {kind!r}; choose from {MAPS}")
        rng = np.random.default_rng(seed)
        self.kind, self.latent, self.rng = kind, latent, rng
        self.extra = extra if kind == "ignored" else 0
        self.main = dim - self.extra
        self.B = rng.standard_normal((self.main, latent)) / np.sqrt(latent)
        # latent weights spread over [0.5, 2]: the teacher cares about some directions 4x more
        # than about others, where raw cosine weighs them all alike
        w = np.exp(rng.uniform(np.log(0.5), np.log(2.0), latent))
        rot = np.linalg.qr(rng.standard_normal((latent, latent)))[0]
        self.M = (rot * w) @ np.linalg.pinv(self.B)  # (latent, main): h = M f
        self.A = rng.standard_normal((256, latent)) / np.sqrt(latent)
        self.b = rng.standard_normal(256) * 0.5
        self.relu_mean = None

    def features(self, n: int) -> np.ndarray:
        z = self.rng.standard_normal((n, self.latent))
        e = self.rng.standard_normal((n, self.main)) * np.sqrt(0.2 / self.main * self.latent)
        f = z @ self.B.T + e
        if self.extra:
            f = np.concatenate([f, 0.15 * self.rng.standard_normal((n, self.extra))], 1)
        return f.astype(np.float32)

    def code(self, f: np.ndarray) -> np.ndarray:
        f = f.astype(np.float64)
        lin = f[:, : self.main] @ self.M.T
        lin /= np.sqrt((lin ** 2).sum(1).mean() / self.latent)  # unit scale per coordinate
        if self.kind == "linear":
            h = lin
        elif self.kind == "nonlinear":
            h = np.maximum(lin @ self.A.T + self.b, 0)
            if self.relu_mean is None:  # centred on the items (the first call)
                self.relu_mean = h.mean(0)
            h = h - self.relu_mean
        else:
            v = f[:, self.main:] / 0.15
            h = np.concatenate([lin, 0.6 * v], 1)
        return _unit(h)


def write_recovery_set(root: Path, kind: str, n_items: int = 20_000, dim: int = 1280,
                       q_train: int = 1000, k: int = 1000, q_test: int = 50,
                       noise: float = 0.25, seed: int = 0, eval_k: int = 100) -> dict:
    """Write one set in the released layout under ``root``; -> its reference figures.

    ``noise`` is the teacher noise's standard deviation in units of the per-query standard
    deviation of the noise-free influence over the items."""
    from attribution.callbacks import map_at_ks

    world = HiddenWorld(kind, dim, seed)
    items = world.features(n_items)
    train_q, test_q = world.features(q_train), world.features(q_test)
    h_items = world.code(items)
    rng = np.random.default_rng(seed + 1)

    def noisy(hq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clean = hq @ h_items.T
        return clean, clean + noise * clean.std(1, keepdims=True) * rng.standard_normal(
            clean.shape)

    # stage 1: the K nearest items by raw cosine; stage 2: ordered by the noisy influence
    raw_train = _unit(train_q) @ _unit(items).T
    kset = _topk_desc(raw_train, k)
    _, inf_train = noisy(world.code(train_q))
    inf_sub = np.take_along_axis(inf_train, kset, 1)
    order = np.argsort(-inf_sub, axis=1, kind="stable")
    train = {"random": {"rank": np.take_along_axis(kset, order, 1).astype(np.int64),
                        "influence_subset": inf_sub.astype(np.float32),
                        "rank_influence_subset": order.astype(np.int64)}}
    clean_test, inf_test = noisy(world.code(test_q))
    test_rank = np.argsort(-inf_test, axis=1, kind="stable")
    test = {"random": {"influence": inf_test.astype(np.float32),
                       "rank": test_rank.astype(np.int64)}}
    folder = root / "feats" / SPACE
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("data_feats", items), ("train_query_feats", train_q),
                      ("test_query_feats", test_q)):
        np.save(folder / f"{name}.npy", arr)
    for split, payload in (("train", train), ("test", test)):
        with open(root / f"influence_{split}.pkl", "wb") as f:
            pickle.dump(payload, f, protocol=4)
    raw_rank = np.argsort(-(_unit(test_q) @ _unit(items).T), axis=1, kind="stable")
    oracle_rank = np.argsort(-clean_test, axis=1, kind="stable")
    return {"raw": map_at_ks(raw_rank, test_rank, [eval_k]),
            "oracle": map_at_ks(oracle_rank, test_rank, [eval_k])}


def _run(data: Path, out: Path, name: str, overrides: list[str]) -> tuple[dict, float, float]:
    """One ``attribution run`` in a child process -> (student metrics, CPU s, wall s)."""
    cmd = [sys.executable, "-m", "attribution", "run",
           str(ROOT / "configs/experiment/coco_released.yaml"), f"data.root={data}",
           f"output_root={out}", f"name={name}", f"features.spaces=[{SPACE}]",
           f"student.feature={SPACE}", "student.k_eval=[100]", "student.k_val=100",
           "student.logger=none", *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"run {name} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stage = sorted((out / name).glob("student-*/metrics.json"), key=lambda p: p.stat().st_mtime)
    metrics = json.loads(stage[-1].read_text())
    return metrics, cpu, wall


def _first(metrics: dict, prefix: str) -> float:
    """The validation mAP whose key starts with ``prefix`` + ...val_mAP@ (k may be clamped)."""
    return next((v for k, v in metrics.items() if k.startswith(prefix) and ".val_mAP@" in k
                 and not k.endswith("_stderr")), float("nan"))


def _head_overrides(spec: str) -> list[str]:
    """'default' | 'linear' | 'mlp:768x4' | 'residual:768' | 'mlp:512,256' -> overrides."""
    if spec == "default":
        return []
    kind, _, widths = spec.partition(":")
    out = [f"student.head={kind}"]
    if widths:
        width, _, times = widths.partition("x")
        hidden = [int(width)] * int(times) if times else [int(w) for w in widths.split(",")]
        out.append(f"student.hidden=[{','.join(map(str, hidden))}]")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", nargs="+", default=list(MAPS), choices=MAPS)
    ap.add_argument("--heads", nargs="+", default=["default"])
    ap.add_argument("--losses", nargs="+", default=["default"])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--train-queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--test-queries", type=int, default=50)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "recovery")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. student.epochs=3)")
    args = ap.parse_args()
    from _common import machine_line

    print(machine_line())
    print(f"sets: N={args.items}, {args.dim}-d, {args.train_queries} training queries x "
          f"K={args.k}, {args.test_queries} test queries, teacher noise {args.noise}; "
          f"mAP@100 on the test queries (full set); val = mAP@100 of held-out training queries "
          f"(student.val_scope, default: their K-set's top 100 ranked among all N)")
    print(f"{'map':>9} {'head':>12} {'loss':>7} {'raw':>6} {'oracle':>6} {'val raw':>7} "
          f"{'val':>6} "
          f"{'student':>13} {'gap closed':>10} {'epochs':>7} {'CPU s':>7} {'wall s':>7}")
    for kind in args.maps:
        params = {"kind": kind, "items": args.items, "dim": args.dim, "q_train":
                  args.train_queries, "k": args.k, "q_test": args.test_queries,
                  "noise": args.noise, "seed": args.seed}
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        data = args.out / "data" / f"{kind}-{key}"
        ref_file = data / "reference.json"
        if ref_file.is_file():
            ref = json.loads(ref_file.read_text())
        else:
            ref = write_recovery_set(data, kind, args.items, args.dim, args.train_queries,
                                     args.k, args.test_queries, args.noise, args.seed)
            ref_file.write_text(json.dumps(ref))  # last: its presence marks a finished set
        raw, oracle = ref["raw"]["mAP@100"], ref["oracle"]["mAP@100"]
        for head in args.heads:
            for loss in args.losses:
                over = list(args.overrides)
                over += _head_overrides(head)
                over += [f"student.loss={loss}"] if loss != "default" else []
                name = f"{kind}-{key}-{head.replace(':', '_').replace(',', '-')}-{loss}" + (
                    "-" + hashlib.sha256(" ".join(args.overrides).encode()).hexdigest()[:6]
                    if args.overrides else "")
                m, cpu, wall = _run(data, args.out, name, over)
                s, se = m["student.mAP@100"], m["student.mAP@100_stderr"]
                closed = (s - raw) / (oracle - raw) if oracle > raw else float("nan")
                print(f"{kind:>9} {head:>12} {m['loss']:>7} {raw:6.3f} {oracle:6.3f} "
                      f"{_first(m, 'baseline.'):6.3f} {_first(m, 'student.'):6.3f} "
                      f"{s:6.3f} ± {se:.3f} {100 * closed:9.0f}% "
                      f"{m['selected_epoch']:>3}/{m['epochs_run']:<3} {cpu:7.0f} {wall:7.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
