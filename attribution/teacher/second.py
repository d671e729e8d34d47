"""A second teacher over the test queries, beside the run's own (``second_teacher``).

The run's teacher (``teacher``) is the one the student trains on and every method is scored
against.  A second teacher — by default the published AbU+ step (``preset:abu_plus_step``:
EK-FAC, gain N², damping 0.1, η = 0.01) on the same world, generator and test queries — ranks
the whole training set for every test query once more, so the report can say which conclusions
depend on the choice of teacher: the two teachers' agreement, and every method's mAP against
each (``attribution/evaluation.py``).  Its settings are the run's ``teacher`` section with the
preset and then ``second_teacher.teacher`` merged over it; a Fisher of another kind or parameter
group is fitted in its own folder.  One file per query (``test_<i>.npy``, checked when read):
a killed run resumes at the next query.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from attribution.common.files import DataFileError, atomic_save_npz
from attribution.config import second_teacher_config
from attribution.teacher.ceiling import query_scores, rescoring_scorer
from attribution.teacher.formats import FISHER_KEYS
from attribution.teacher.run import fit_fisher, teacher_gain, test_queries


def run_second_teacher(cfg, world_dir: Path, text_dir: Path, gen_dir: Path, queries_dir: Path,
                       fisher_dir: Path, out: Path, progress: bool = True) -> dict:
    """Score every test query over the whole training set with the second teacher; write
    ``teacher_test.npz`` (``rank`` int32 (Q_test, N), most influential first; ``influence``)."""
    out.mkdir(parents=True, exist_ok=True)
    second = second_teacher_config(cfg)
    tc = second.teacher
    if any(tc[k] != cfg.teacher[k] for k in FISHER_KEYS):
        fisher_dir = out / "fisher"
        if not (fisher_dir / "fisher.json").is_file():
            fit_fisher(second, world_dir, text_dir, gen_dir, fisher_dir, progress)
    scorer, cands = rescoring_scorer(second, world_dir, text_dir, gen_dir, fisher_dir, out)
    queries = test_queries(queries_dir, cands)
    start = time.time()
    scores, fresh = query_scores(scorer, queries, out, "test", len(cands), progress, second)
    if not np.isfinite(scores).all():
        raise DataFileError(f"the second teacher's influences in {out} are not all finite")
    rank = np.argsort(-scores, axis=1, kind="stable").astype(np.int32)
    atomic_save_npz(out / "teacher_test.npz", rank=rank, influence=scores.astype(np.float32))
    return {"name": cfg.second_teacher.name, "queries": len(queries),
            "gain": teacher_gain(tc, len(cands)), "estimator": tc.estimator,
            "fisher": tc.fisher, "seconds_per_query": (time.time() - start) / max(fresh, 1)
            if fresh else float("nan")}
