"""compare_schedules: does a shorter retraining schedule rank removals as the full one does?"""

import numpy as np
import pytest

from attribution.counterfactual import compare_schedules, format_schedules


def _result(steps, values):
    return {"steps": steps, "k": 10, "rows": [{"method": m, "query": q, "delta_loss": v}
                                     for (m, q), v in values.items()]}


def test_a_scaled_copy_agrees_exactly_and_a_reversal_is_caught():
    """Known answers: a short schedule whose ΔLoss is the full one's times 0.3 correlates 1 and
    recovers the scale; every pairwise difference keeps its sign.  Reversing the methods'
    order flips the signs and the correlation."""
    rng = np.random.default_rng(0)
    full = {(m, q): base + rng.normal(0, 0.1) for q in range(6)
            for m, base in (("teacher", 2.0), ("student", 1.0), ("random", 0.0))}
    same = compare_schedules(_result(1000, full), _result(300, {k: 0.3 * v
                                                                for k, v in full.items()}))
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["scale"] == pytest.approx(1 / 0.3)
    assert len(same["pairs"]) == 3 and all(p["same_sign"] for p in same["pairs"])
    flipped = compare_schedules(_result(1000, full), _result(300, {k: -v
                                                                   for k, v in full.items()}))
    assert flipped["pearson"] < -0.9 and not any(p["same_sign"] for p in flipped["pairs"])
    assert "Spearman" in format_schedules(same)
    with pytest.raises(ValueError, match="different numbers"):
        compare_schedules(_result(1000, full), {**_result(300, full), "k": 5})
    with pytest.raises(ValueError, match="share 0"):
        compare_schedules(_result(1000, full), _result(300, {("x", 99): 1.0}))
