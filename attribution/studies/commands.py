"""``attribution study NAME CONFIG``: each study's command, on a run whose teacher is finished.

A handler receives the parsed arguments, the config, the run's stage folders and the study's
folder (tied to the teacher's key), and returns the exit code.
"""

from __future__ import annotations

from pathlib import Path

from attribution.common.files import Dirs


def teacher_steps(args, cfg, dirs: Dirs, out: Path) -> int:
    from attribution.studies.steps_table import format_steps
    from attribution.studies.teacher_steps import fragment_of, run_step_study

    summary = run_step_study(cfg, dirs, out, args.factors, args.queries,
                             progress=not args.no_progress, dampings=args.dampings,
                             split=args.split, path=args.path, even=args.even)
    print(format_steps(summary))
    fragment = fragment_of(out, args.split, args.even, args.path)
    print(f"figure: {fragment.with_name(fragment.name.replace('.report.md', '.png'))}; the "
          f"run's report includes {fragment.name} from there")
    return 0


def teacher_curvature(args, cfg, dirs: Dirs, out: Path) -> int:
    from attribution.studies.curvature import run_curvature

    summary = run_curvature(cfg, dirs, out, args.split, args.queries, not args.no_progress)
    recall = ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if "recall" in k)
    speed = summary["seconds_per_query"]
    print(f"curvature (Gauss–Newton, difference factor {summary['difference_factor']:g}) on "
          f"{len(summary['rows_scored'])} {args.split} queries"
          + (f", {speed:.1f} s a query" if speed else ", all cached")
          + (f"; {recall}" if recall else "")
          + f"; ranked as teacher-gn -> {Path(out) / 'gn'}")
    return 0


STUDIES = {"teacher-steps": teacher_steps, "teacher-curvature": teacher_curvature}
