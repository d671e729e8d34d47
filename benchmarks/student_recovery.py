"""Recovery benchmark: can the student learn a teacher whose influence is a KNOWN function?

Usage:  python benchmarks/student_recovery.py [--maps linear nonlinear ignored]
            [--stage1 same other random] [--ks 1000 10000] [--k-vals default 500]
            [--heads default linear mlp:768x4 residual:768] [--losses default ce mse]
            [--out runs/recovery] [--set key=value ...]

For each hidden map, each way stage 1 picks the K-set and each K it writes a synthetic set in
the exact released layout (docs/method.md §6; ``attribution/data/released.py``) and trains
the student through the real command, ``attribution run configs/experiment/coco_released.yaml
data.root=<set> ...``, once per head kind, loss and validation k asked for ("default" = what
the config ships).  Sizes (defaults): N = 20,000 items, 1,280-d features, 1,000 training
queries x K = 1,000 stage-1 candidates, 50 test queries; mAP@100 over the whole set (0.5 % of
N, as 500 of MSCOCO's 118k is 0.4 %).

The world.  Features f = B z + e (z: 48-d latent; e: isotropic noise, 1/5 of the signal's energy).  The teacher's influence
of item j on query q is  cos(h(f_q), h(f_j)) + sigma * noise, for a hidden map h:
  linear     h = M f, M = W B+ (a rotation and weights in [0.5, 2] of the latent directions);
  nonlinear  h = centred ReLU(A M f + b), 256 random units with biases: a one-hidden-layer
             network of the linear code (an MLP can represent it, a linear head cannot);
  ignored    f gains 64 low-variance dimensions v (scale 0.15: raw cosine barely sees them)
             and h = [M f_main, 0.6 v]: the influence leans on what stage 1 ignores.
Stage-1 K-sets (``--stage1``) are the K nearest items by raw cosine of the student's own
features (``same``, as the reference curates by the DINO features it also trains on), the K
nearest in another feature space of the same latents (``other``), or K random items
(``random``); training rankings order them by the noisy influence; test rankings are full-set
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

    def features(self, n: int, latent: bool = False):
        """float32 (n, dim) features; with ``latent`` also their latent codes z (n, latent)."""
        z = self.rng.standard_normal((n, self.latent))
        e = self.rng.standard_normal((n, self.main)) * np.sqrt(0.2 / self.main * self.latent)
        f = z @ self.B.T + e
        if self.extra:
            f = np.concatenate([f, 0.15 * self.rng.standard_normal((n, self.extra))], 1)
        return (f.astype(np.float32), z) if latent else f.astype(np.float32)

    def other_view(self, z: np.ndarray, seed: int, dim: int = 512) -> np.ndarray:
        """Another feature space of the same latents (stage 1 by "other features"): its own
        basis and latent weights (log-uniform in [0.25, 4]) and noise of half the signal's
        energy; drawn from its own generator, so the set's other draws do not move."""
        rng = np.random.default_rng([seed, 97])
        w = np.exp(rng.uniform(np.log(0.25), np.log(4.0), self.latent))
        c = rng.standard_normal((dim, self.latent)) / np.sqrt(self.latent)
        g = (z * w) @ c.T
        g += rng.standard_normal(g.shape) * np.sqrt(0.5 * (g ** 2).sum(1).mean() / dim)
        return g

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


STAGE1 = ("same", "other", "random")


def make_recovery_set(kind: str, n_items: int = 20_000, dim: int = 1280, q_train: int = 1000,
                      k: int = 1000, q_test: int = 50, noise: float = 0.25, seed: int = 0,
                      stage1: str = "same", q_audit: int = 0) -> dict[str, np.ndarray]:
    """One set's arrays (see the module docstring).

    ``noise``: the teacher noise's standard deviation in units of the per-query standard
    deviation of the noise-free influence over the items.  ``stage1``: how each training
    query's K candidates are picked — ``same``: the K nearest by raw cosine of the features the
    student reads (the reference curates by the same DINO features); ``other``: the K nearest
    in another feature space of the same latents (:meth:`HiddenWorld.other_view`); ``random``:
    K items drawn uniformly.  ``q_audit``: extra queries ranked over the whole set like the
    test queries, for judging a validation rule without reading the test queries.

    Returns items, train_q, test_q, audit_q (features), train_rank (Q, K), train_inf (Q, K),
    train_order (Q, K), test_inf / test_rank (Q_test, N), test_clean, audit_rank."""
    if stage1 not in STAGE1:
        raise ValueError(f"stage1 must be one of {STAGE1}, got {stage1!r}")
    world = HiddenWorld(kind, dim, seed)
    items, z_items = world.features(n_items, latent=True)
    train_q, z_train = world.features(q_train, latent=True)
    test_q = world.features(q_test)
    h_items = world.code(items)
    rng = np.random.default_rng(seed + 1)

    def noisy(hq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clean = hq @ h_items.T
        return clean, clean + noise * clean.std(1, keepdims=True) * rng.standard_normal(
            clean.shape)

    # stage 1 picks the K-set; stage 2 orders it by the noisy influence
    if stage1 == "same":
        kset = _topk_desc(_unit(train_q) @ _unit(items).T, k)
    elif stage1 == "other":
        kset = _topk_desc(_unit(world.other_view(z_train, seed)) @ _unit(
            world.other_view(z_items, seed)).T, k)
    else:
        pick = np.random.default_rng([seed, 101])
        kset = np.stack([pick.choice(n_items, k, replace=False) for _ in range(q_train)])
    _, inf_train = noisy(world.code(train_q))
    inf_sub = np.take_along_axis(inf_train, kset, 1)
    order = np.argsort(-inf_sub, axis=1, kind="stable")
    clean_test, inf_test = noisy(world.code(test_q))
    out = {"items": items, "train_q": train_q, "test_q": test_q,
           "train_rank": np.take_along_axis(kset, order, 1).astype(np.int64),
           "train_inf": inf_sub.astype(np.float32), "train_order": order.astype(np.int64),
           "test_inf": inf_test.astype(np.float32),
           "test_rank": np.argsort(-inf_test, axis=1, kind="stable").astype(np.int64),
           "test_clean": clean_test}
    if q_audit:  # drawn after everything above: the other arrays do not depend on q_audit
        audit_q = world.features(q_audit)
        _, inf_audit = noisy(world.code(audit_q))
        out["audit_q"] = audit_q
        out["audit_rank"] = np.argsort(-inf_audit, axis=1, kind="stable").astype(np.int64)
    return out


def write_recovery_set(root: Path, kind: str, n_items: int = 20_000, dim: int = 1280,
                       q_train: int = 1000, k: int = 1000, q_test: int = 50,
                       noise: float = 0.25, seed: int = 0, eval_k: int = 100,
                       stage1: str = "same") -> dict:
    """Write one set (:func:`make_recovery_set`) in the released layout under ``root``;
    -> its reference figures on the test queries (raw cosine, the noise-free oracle)."""
    from attribution.callbacks import map_at_ks

    s = make_recovery_set(kind, n_items, dim, q_train, k, q_test, noise, seed, stage1)
    train = {"random": {"rank": s["train_rank"], "influence_subset": s["train_inf"],
                        "rank_influence_subset": s["train_order"]}}
    test = {"random": {"influence": s["test_inf"], "rank": s["test_rank"]}}
    folder = root / "feats" / SPACE
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("data_feats", s["items"]), ("train_query_feats", s["train_q"]),
                      ("test_query_feats", s["test_q"])):
        np.save(folder / f"{name}.npy", arr)
    for split, payload in (("train", train), ("test", test)):
        with open(root / f"influence_{split}.pkl", "wb") as f:
            pickle.dump(payload, f, protocol=4)
    raw_rank = np.argsort(-(_unit(s["test_q"]) @ _unit(s["items"]).T), axis=1, kind="stable")
    oracle_rank = np.argsort(-s["test_clean"], axis=1, kind="stable")
    return {"raw": map_at_ks(raw_rank, s["test_rank"], [eval_k]),
            "oracle": map_at_ks(oracle_rank, s["test_rank"], [eval_k])}


def _run(data: Path, out: Path, name: str, overrides: list[str]) -> tuple[dict, float, float]:
    """One ``attribution run`` in a child process -> (student metrics, CPU s, wall s)."""
    cmd = [sys.executable, "-m", "attribution", "run",
           str(ROOT / "configs/experiment/coco_released.yaml"), f"data.root={data}",
           f"output_root={out}", f"name={name}", f"features.spaces=[{SPACE}]",
           f"student.feature={SPACE}", "student.k_eval=[100]", "student.logger=none",
           *overrides]
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
    ap.add_argument("--stage1", nargs="+", default=["same"], choices=STAGE1)
    ap.add_argument("--ks", nargs="+", type=int, default=[1000])
    ap.add_argument("--k-vals", nargs="+", default=["default"],
                    help="student.k_val per run: default (the config's: derived from K) or a number")
    ap.add_argument("--test-queries", type=int, default=50)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "recovery")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. student.epochs=3)")
    args = ap.parse_args()
    from _common import machine_line

    print(machine_line())
    print(f"sets: N={args.items}, {args.dim}-d, {args.train_queries} training queries x K, "
          f"{args.test_queries} test queries, teacher noise {args.noise}; mAP@100 on the test "
          f"queries (full set); val = validation mAP@k_val of held-out training queries "
          f"(student.val_scope); overrides: {' '.join(args.overrides) or 'none'}")
    print(f"{'map':>9} {'stage 1':>7} {'K':>6} {'head':>12} {'loss':>8} {'k_val':>5} "
          f"{'raw':>6} {'oracle':>6} {'val raw':>7} {'val':>6} {'student':>13} "
          f"{'gap closed':>10} {'epochs':>7} {'CPU s':>7} {'wall s':>7}")
    for kind in args.maps:
        for stage1 in args.stage1:
            for k in args.ks:
                data, ref = _recovery_set(args, kind, stage1, k)
                for head in args.heads:
                    for loss in args.losses:
                        for k_val in args.k_vals:
                            _report_run(args, data, ref, kind, stage1, k, head, loss, k_val)


def _recovery_set(args, kind: str, stage1: str, k: int) -> tuple[Path, dict]:
    """The cached set of these parameters (written on first use) and its references."""
    params = {"kind": kind, "items": args.items, "dim": args.dim, "q_train":
              args.train_queries, "k": k, "q_test": args.test_queries,
              "noise": args.noise, "seed": args.seed}
    if stage1 != "same":  # the sets made before the option keep their key
        params["stage1"] = stage1
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    data = args.out / "data" / f"{kind}-{key}"
    ref_file = data / "reference.json"
    if ref_file.is_file():
        return data, json.loads(ref_file.read_text())
    ref = write_recovery_set(data, kind, args.items, args.dim, args.train_queries, k,
                             args.test_queries, args.noise, args.seed, stage1=stage1)
    ref_file.write_text(json.dumps(ref))  # last: its presence marks a finished set
    return data, ref


def _report_run(args, data: Path, ref: dict, kind: str, stage1: str, k: int, head: str,
                loss: str, k_val: str) -> None:
    raw, oracle = ref["raw"]["mAP@100"], ref["oracle"]["mAP@100"]
    over = list(args.overrides) + _head_overrides(head)
    over += [f"student.loss={loss}"] if loss != "default" else []
    over += [f"student.k_val={k_val}"] if k_val != "default" else []
    tag = " ".join(o for o in over if o not in args.overrides) + " " + " ".join(args.overrides)
    name = f"{data.name}-" + hashlib.sha256(tag.encode()).hexdigest()[:10]
    m, cpu, wall = _run(data, args.out, name, over)
    s, se = m["student.mAP@100"], m["student.mAP@100_stderr"]
    closed = (s - raw) / (oracle - raw) if oracle > raw else float("nan")
    print(f"{kind:>9} {stage1:>7} {k:>6} {head:>12} {m['loss']:>8} "
          f"{m.get('student.val_k', '?'):>5} {raw:6.3f} {oracle:6.3f} "
          f"{_first(m, 'baseline.'):6.3f} {_first(m, 'student.'):6.3f} "
          f"{s:6.3f} ± {se:.3f} {100 * closed:9.0f}% "
          f"{m['selected_epoch']:>3}/{m['epochs_run']:<3} {cpu:7.0f} {wall:7.0f}", flush=True)


if __name__ == "__main__":
    main()
