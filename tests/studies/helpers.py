"""Run a study on a test's pipeline the way ``attribution study NAME`` does: the teacher stage
first (cached), then the study in the folder tied to the teacher's key."""

from __future__ import annotations

from attribution.studies.curvature import run_curvature
from attribution.studies.teacher_steps import run_step_study


def step_study(pipe, factors=None, n_queries=None, **kw) -> dict:
    pipe.run(["teacher"])
    return run_step_study(pipe.cfg, pipe.dirs(), pipe.step_study_dir(), factors, n_queries, **kw)


def curvature_study(pipe, split="test", n_queries=None, progress=False) -> dict:
    pipe.run(["teacher"])
    return run_curvature(pipe.cfg, pipe.dirs(), pipe.step_study_dir(), split, n_queries, progress)
