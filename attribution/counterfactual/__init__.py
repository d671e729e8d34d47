"""Leave-K-out counterfactual evaluation: ``run`` retrains and measures, ``results`` reads,
summarizes and compares what it wrote (docs/method.md §4)."""
