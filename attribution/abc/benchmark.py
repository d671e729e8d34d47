"""The customization benchmark with known answers (AbC): the pool, its queries, and how a ranking
of the pool is scored.

The retrieval pool is the training set ∪ every concept's exemplars.  Each synthesized image ranks
the pool; its exemplars are the known answers.  Reported on held-out concepts, per kind (object /
style): Recall@K and mAP of the exemplars, with chance.  The stages that build and score it are
``customize_stage.py`` (customized generators and their images) and ``stages.py`` (the teacher on
them, and every method's table); soft attribution is ``calibration.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from attribution.abc import concepts as C
from attribution.abc.calibration import Calibrator, calibration_report, fit_calibrator
from attribution.common.files import DataFileError, load_npy
from attribution.data.dataset import CaptionedImageSet
from attribution.data.images import from_uint8
from attribution.features.cache import load_features, space_dir
from attribution.metrics import average_precision, recall_at_k, standard_error
from attribution.student.deploy import extractor_for

SAMPLE_ID_BASE = 2_000_000  # synthesized images' sampling/draw ids: disjoint from the queries'


def all_concepts(cfg) -> list[C.Concept]:
    """Training concepts first (``abc.n_train``), then held-out ones; kinds alternate."""
    a = cfg.abc
    return C.make_concepts(a.n_train + a.n_test, a.exemplars, cfg.seed)


def split_of(cfg, concept: C.Concept) -> str:
    return "train" if concept.index < cfg.abc.n_train else "test"


class Benchmark:
    """The pool, the synthesized queries and their known answers, read from a customize stage.

    Pool: ids 0..N−1 are the training items, N.. the exemplars in concept order.
    Queries: every synthesized image, with its concept, kind and split.
    """

    def __init__(self, world: CaptionedImageSet, customize_dir: Path):
        self.world, self.dir = world, Path(customize_dir)
        path = self.dir / "concepts.json"
        if not path.is_file():
            raise DataFileError(f"customization results missing: {path} (run the customize stage)")
        self.concepts = json.loads(path.read_text())
        n = len(world)
        ex_images, ex_caps, ex_owner, q_images, q_prompts, q_owner = [], [], [], [], [], []
        self.synth = []
        for c in self.concepts:
            f = dict(np.load(self.dir / "synth" / f"{c['index']:03d}.npz"))
            self.synth.append(f)
            ex_images.append(f["exemplar_images"])
            ex_caps += [caps[0] for caps in c["exemplar_captions"]]
            ex_owner += [c["index"]] * len(f["exemplar_images"])
            q_images.append(f["images"])
            q_prompts += c["prompts"]
            q_owner += [c["index"]] * len(f["images"])
        self.n_items = n
        self.exemplar_images = np.concatenate(ex_images)
        self.exemplar_captions = ex_caps
        self.exemplar_owner = np.asarray(ex_owner)
        self.query_images = np.concatenate(q_images)
        self.query_prompts = q_prompts
        self.query_owner = np.asarray(q_owner)
        by_index = {c["index"]: c for c in self.concepts}
        self.query_kind = np.asarray([by_index[i]["kind"] for i in q_owner])
        self.query_split = np.asarray([by_index[i]["split"] for i in q_owner])
        owner_of_pool = np.concatenate([np.full(n, -1), self.exemplar_owner])
        self.positives = self.query_owner[:, None] == owner_of_pool[None, :]  # bool (Q, P)
        # the pool a training concept's mapper may see: training items + training exemplars
        train_ids = {c["index"] for c in self.concepts if c["split"] == "train"}
        self.train_pool = np.concatenate([np.ones(n, bool),
                                          np.isin(self.exemplar_owner, list(train_ids))])

    @property
    def pool_size(self) -> int:
        return self.n_items + len(self.exemplar_owner)

    def exemplar_ids(self, q: int) -> np.ndarray:
        return np.flatnonzero(self.positives[q])


def chance_average_precision(pool: int, positives: int) -> float:
    """E[AP] of a uniformly random ranking: (1/P)·[H_P + (n−1)/(P−1)·(P − H_P)]."""
    h = float(np.sum(1.0 / np.arange(1, pool + 1)))
    if pool == 1:
        return 1.0
    return (h + (positives - 1) / (pool - 1) * (pool - h)) / pool


def evaluate_rankings(rankings: np.ndarray, positives: np.ndarray, kinds: np.ndarray,
                      ks: list[int]) -> dict:
    """Recall@k and mAP of the known answers, overall and per kind.

    Args:
        rankings: int (Q, P) pool ids best first; positives: bool (Q, P); kinds: (Q,) strings.

    Returns:
        {kind or "all": {"recall@k": mean, "mAP": mean, "mAP_stderr": s.e., "queries": n}}
    """
    per = {"ap": [], **{k: [] for k in ks}}
    for r, pos in zip(rankings, positives):
        ids = np.flatnonzero(pos)
        per["ap"].append(average_precision(r, ids))
        for k in ks:
            per[k].append(recall_at_k(r, ids, k))
    out = {}
    for kind in ["all", *sorted(set(kinds.tolist()))]:
        sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        if not sel.any():
            continue
        ap = np.asarray(per["ap"])[sel]
        row = {f"recall@{k}": float(np.mean(np.asarray(per[k])[sel])) for k in ks}
        row.update({"mAP": float(ap.mean()), "mAP_stderr": standard_error(ap),
                    "queries": int(sel.sum())})
        out[kind] = row
    return out


def _normalize(x: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=-1)


def _rank(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def space_features(cfg, dirs, bench: Benchmark, space: str) -> tuple[np.ndarray, np.ndarray]:
    """(pool (P, D), queries (Q, D)) features: training items from the features stage's cache,
    exemplars and synthesized images extracted here (image + caption / prompt)."""
    items = np.asarray(load_features(space_dir(dirs["features"], space),
                                     expect_items=bench.n_items, expect_name=space)["items"])
    ext = extractor_for(cfg, dirs, space, bench.world.manifest["image_size"])
    ex = ext.extract(from_uint8(bench.exemplar_images), bench.exemplar_captions).numpy()
    q = ext.extract(from_uint8(bench.query_images), bench.query_prompts).numpy()
    return np.concatenate([items, ex]).astype(np.float32), q.astype(np.float32)


def load_teacher_scores(folder: Path) -> dict[int, np.ndarray]:
    return {int(f.stem): load_npy(f, "Customization teacher scores")
            for f in sorted((Path(folder) / "teacher").glob("*.npy")) if f.stem.isdigit()}


def spaces_to_tune(cfg, spaces: list[str]) -> list[str]:
    return [s for s in spaces if s in (list(cfg.abc.tuned_spaces) or spaces)]


def calibrate(scores: dict[str, np.ndarray], positives: np.ndarray, train: np.ndarray,
              test: np.ndarray, fixed: list[float]) -> tuple[dict, dict[str, Calibrator]]:
    """Per method: fit (τ, b) on the ``train`` queries (the calibration concepts); report it and
    fixed-τ softmaxes on the ``test`` (held-out) queries."""
    report, fitted = {}, {}
    for method, s in scores.items():
        cal = fit_calibrator(s[train], positives[train])
        fitted[method] = cal
        row = {"fitted": {**cal.to_dict(), **calibration_report(cal, s[test], positives[test])}}
        for tau in fixed:
            fixed_cal = Calibrator(tau)
            row[f"tau={tau:g}"] = {**fixed_cal.to_dict(),
                                   **calibration_report(fixed_cal, s[test], positives[test])}
        report[method] = row
    return report, fitted


