"""Study: which validation rule picks the checkpoint a held-out audit would pick?

Usage:  python benchmarks/validation_study.py [--maps linear nonlinear] [--stage1 same other
            random] [--ks 1000 10000] [--checkpoints 10] [--steps-per-checkpoint 220]
            [--heads linear:listwise mlp:ce] [--out runs/validation_study]

Validation chooses the student's epoch, the defaults and the sweep winners, but it sees only
the teacher's ranking of each validation query's K-set (stage 1's candidates).  Three rules,
each computing mAP@k_val of the K-set's top k_val (``attribution/callbacks.py``):
  full     ranked among every item (items outside the K-set count as misses);
  kset     ranked among the K-set only;
  sampled  ranked among the K-set and K items drawn at random from outside it.

The sets are the recovery benchmark's (``student_recovery.py``: released-layout worlds whose
teacher influence is a known function of the features), varied in how stage 1 picks the
K-set (``same``: nearest by the student's own raw features; ``other``: nearest in another
feature space; ``random``), in K (1,000 and 10,000 of N = 20,000) and in k_val (100, 500).
Each set also carries 100 AUDIT queries ranked by the teacher over the whole set, like test
queries but never the reported ones: a rule is judged by the audit mAP@100 of the checkpoint
it picks.  The test queries are not read.

A student (the shipped coco_released recipe unless --heads says otherwise: linear head from
the identity, listwise loss, AdamW 1e-3, 32 queries x 128 pairs, p = 0.1) is trained on 900
training queries; after every ``--steps-per-checkpoint`` steps (220 = one pass over the 900 x
1,000 pairs of K = 1,000) each rule scores the head, and so does the audit.  Checkpoint 0 is
the untrained head (raw cosine for the identity heads).

Decision rule, fixed before the first run (docs/benchmarks.md, "Validation rules"):
  regret = audit(best checkpoint) - audit(the rule's pick); harm = audit(checkpoint 0) -
  audit(pick).  The default rule is the one with the lowest mean regret over every run, among
  those with no run of harm > 2 s.e. of the audit figure; within 0.005 mean regret, the lower
  worst-case regret wins.  k_val likewise between "derived" (min(smallest k_eval, K / 10))
  and 500.
Budget: about 2.5 hours on 2 cores for the default grid (12 runs of ~11 min; first set at
90 minutes before a run had been timed).  Prints a table per run and the
summary; writes every figure to ``<out>/study.json`` (runs already there are not redone).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from student_recovery import make_recovery_set

from attribution.callbacks import (
    VAL_SCOPES,
    ValidationCallback,
    map_at_ks,
    rank_all,
)
from attribution.student.data import EpochKeySampler, PairPlan, collate_pairs
from attribution.student.head import EmbeddingHead, head_dims
from attribution.student.losses import build_loss

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS, DIM, Q_TRAIN, N_VAL, Q_AUDIT, AUDIT_K = 20_000, 1280, 1000, 100, 100, 100
K_VALS = ("derived", 500)


def derived_k_val(k: int, k_eval: int = AUDIT_K) -> int:
    return max(1, min(k_eval, k // 10))


class Trainer:
    """The student's training step, without Lightning (the same head, loss and pairs)."""

    def __init__(self, s: dict, train_rows: np.ndarray, head: str, loss: str, seed: int):
        kind, _, widths = head.partition(":")
        hidden = [int(w) for w in widths.split("x")] if widths else [768]
        hidden = [hidden[0]] * int(widths.split("x")[1]) if "x" in widths else hidden
        torch.manual_seed(seed)
        self.items = torch.from_numpy(s["items"])
        self.queries = torch.from_numpy(s["train_q"][train_rows])
        self.head = EmbeddingHead(head_dims(kind, DIM, hidden), 0.1, False, 5.0, kind)
        self.loss = build_loss(loss, target_temperature=0.1)
        params = [p for p in self.head.parameters()
                  if not (self.loss.shift_invariant and p is self.head.beta)]
        self.opt = torch.optim.AdamW(params + list(self.loss.parameters()), lr=1e-3,
                                     weight_decay=0.0)
        self.plan = PairPlan(s["train_rank"][train_rows], N_ITEMS, 128, 0.1, None, seed)
        self.seed, self.epoch, self.keys = seed, 0, []

    def _next_keys(self, n: int) -> list:
        while len(self.keys) < n:
            sampler = EpochKeySampler(len(self.plan), self.seed)
            sampler.set_epoch(self.epoch)
            self.keys += list(sampler)
            self.epoch += 1
        out, self.keys = self.keys[:n], self.keys[n:]
        return out

    def steps(self, n: int, batch: int = 32) -> None:
        self.head.train()
        for _ in range(n):
            b = collate_pairs([self.plan[key] for key in self._next_keys(batch)])
            uniq, inv = torch.unique(b["items"], return_inverse=True)
            ex = self.head.embed(self.items[uniq])[inv]
            eq = self.head.embed(self.queries[b["query"]])
            loss = self.loss(self.head.score(eq, ex), b["target"])["loss"]
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        was = self.head.training
        self.head.eval()
        out = torch.cat([self.head.embed(torch.as_tensor(x[i : i + 4096]))
                         for i in range(0, len(x), 4096)])
        self.head.train(was)
        return out


def run_one(kind: str, stage1: str, k: int, head: str, loss: str, checkpoints: int,
            steps_per: int, seed: int = 0) -> dict:
    t0 = time.time()
    s = make_recovery_set(kind, N_ITEMS, DIM, Q_TRAIN, k, q_test=1, noise=0.25, seed=seed,
                          stage1=stage1, q_audit=Q_AUDIT)
    rng = np.random.default_rng([seed, 79])
    val_rows = np.sort(rng.permutation(Q_TRAIN)[:N_VAL])
    train_rows = np.setdiff1d(np.arange(Q_TRAIN), val_rows)
    tr = Trainer(s, train_rows, head, loss, seed)
    vq = s["train_q"][val_rows]
    rules = {}
    for k_val in K_VALS:
        kv = derived_k_val(k) if k_val == "derived" else k_val
        for scope in VAL_SCOPES:
            rules[f"{scope}@{k_val}"] = ValidationCallback(
                s["items"], vq, s["train_rank"][val_rows], kv, scope=scope, seed=seed)
    # how much of each validation query's teacher top k_val is inside its K-set is unknown
    # to a user; here the audit queries' full-set ranking tells what stage 1 would keep
    audit_q = torch.from_numpy(s["audit_q"])
    items = torch.from_numpy(s["items"])
    history = {name: [] for name in rules}
    audit = []
    for c in range(checkpoints + 1):
        if c:
            tr.steps(steps_per)
        for name, cb in rules.items():
            history[name].append(cb.evaluate(tr.embed))
        a = map_at_ks(rank_all(tr.embed(audit_q), tr.embed(items)), s["audit_rank"], [AUDIT_K])
        audit.append((a[f"mAP@{AUDIT_K}"], a[f"mAP@{AUDIT_K}_stderr"]))
        print(f"  checkpoint {c:2d}: audit {audit[-1][0]:.3f}  " + "  ".join(
            f"{n} {h[-1][0]:.3f}" for n, h in history.items()), flush=True)
    return {"map": kind, "stage1": stage1, "k": k, "head": head, "loss": loss,
            "audit": audit, "history": history, "seconds": time.time() - t0,
            "steps_per_checkpoint": steps_per}


def judge(run: dict) -> dict:
    audit = np.array([a for a, _ in run["audit"]])
    se = np.array([e for _, e in run["audit"]])
    best = audit.max()
    out = {}
    for name, h in run["history"].items():
        vals = np.array([v for v, _ in h])
        pick = int(np.argmax(vals))  # earliest of ties, as the callback keeps the first best
        out[name] = {"pick": pick, "regret": float(best - audit[pick]),
                     "harm": float(audit[0] - audit[pick]), "harm_se": float(se[pick])}
    return out


def summary(runs: list[dict]) -> None:
    judged = [judge(r) for r in runs]
    print(f"\n{'rule':>14} {'mean regret':>11} {'worst':>6} {'harmful runs':>12}")
    for name in judged[0]:
        reg = np.array([j[name]["regret"] for j in judged])
        harmful = sum(j[name]["harm"] > 2 * j[name]["harm_se"] for j in judged)
        print(f"{name:>14} {reg.mean():11.4f} {reg.max():6.3f} {harmful:>6}/{len(judged)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", nargs="+", default=["linear", "nonlinear"])
    ap.add_argument("--stage1", nargs="+", default=["same", "other", "random"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1000, 10000])
    ap.add_argument("--heads", nargs="+", default=["linear:listwise"],
                    help="HEAD:LOSS, HEAD = linear | mlp:768x4 | residual:768")
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--steps-per-checkpoint", type=int, default=220)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "validation_study")
    args = ap.parse_args()
    from _common import machine_line

    print(machine_line())
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "study.json"
    runs = json.loads(store.read_text()) if store.is_file() else []
    for kind in args.maps:
        for stage1 in args.stage1:
            for k in args.ks:
                for spec in args.heads:
                    head, _, loss = spec.rpartition(":")
                    key = dict(map=kind, stage1=stage1, k=k, head=head, loss=loss,
                               steps_per_checkpoint=args.steps_per_checkpoint)
                    done = [r for r in runs if all(r[a] == b for a, b in key.items())
                            and len(r["audit"]) == args.checkpoints + 1]
                    if not done:
                        print(f"{kind} map, stage 1 {stage1}, K={k}, {head} + {loss}:")
                        runs.append(run_one(kind, stage1, k, head, loss, args.checkpoints,
                                            args.steps_per_checkpoint))
                        store.write_text(json.dumps(runs))
                    r = done[0] if done else runs[-1]
                    j = judge(r)
                    print(f"{kind:>9} {stage1:>6} K={k:<5} {head}+{loss}: audit "
                          f"{r['audit'][0][0]:.3f} -> best {max(a for a, _ in r['audit']):.3f}; "
                          + ", ".join(f"{n} picks {v['pick']} (regret {v['regret']:.3f})"
                                      for n, v in j.items()), flush=True)
    wanted = [r for r in runs if r["map"] in args.maps and r["stage1"] in args.stage1
              and r["k"] in args.ks]
    if wanted:
        summary(wanted)


if __name__ == "__main__":
    main()
