"""Every figure the project draws, from finished artifacts only: a run's own (``run.py``) and the
sweeps' (``sweeps.py``)."""

from attribution.figures.base import METHOD_NAMES
from attribution.figures.run import (
    _human,
    abc_figure,
    counterfactual_figure,
    methods_of_run,
    quality_vs_throughput,
    tuned_vs_untuned,
)
from attribution.figures.sweeps import (
    aggregate,
    read_rows,
    report_metric,
    rows_from_wandb,
    sweep_figure,
    sweep_figures,
    varied_keys,
)

__all__ = ["METHOD_NAMES", "_human", "abc_figure", "aggregate", "counterfactual_figure", "methods_of_run",
           "quality_vs_throughput", "read_rows", "report_metric", "rows_from_wandb",
           "sweep_figure", "sweep_figures", "tuned_vs_untuned", "varied_keys"]
