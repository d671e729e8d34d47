"""Research studies of the teacher and the student, beside the core: none of them runs in the
main job, and the core never imports this package (an import-linter contract).

- ``teacher_steps``: how the teacher's rankings move with its step size (``--dampings``,
  ``--split val`` to choose without the test set, ``--path`` for an unlearning path, ``--even``
  for the even part of the loss change);
- ``curvature``: the step-free Gauss–Newton limit of the quadratic teacher;
- ``scoring``: the ways of scoring one query these need (several steps from one gradient, a path);
- one-off analyses over a finished run or study are entry scripts outside the library
  (``python experiments/studies/<name>.py CONFIG``), as they drive the pipeline.

Command group: ``attribution study teacher-steps|teacher-curvature CONFIG [key=value ...]``.
What they write, the counterfactual reads as methods (``teacher@<factor>``, ``teacher-gn``)
through the file layout of ``attribution/counterfactual/study_files.py``.  docs/studies.md has
the questions, the commands and the results.
"""
