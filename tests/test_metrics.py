import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from attribution.metrics import (
    average_precision,
    chance_reciprocal_rank,
    mean_average_precision,
    recall_at_k,
    reciprocal_rank,
)


def test_average_precision_by_hand():
    # positives at positions 1 and 3 (1-based): (1/1 + 2/3) / 2
    assert average_precision([7, 2, 9, 4], {7, 9}) == pytest.approx((1 + 2 / 3) / 2)
    # a positive missing from a truncated ranking counts as precision 0
    assert average_precision([7, 2], {7, 9}) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(20))
def test_average_precision_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    ranking = rng.permutation(n)
    positives = set(rng.choice(n, size=int(rng.integers(1, n)), replace=False).tolist())
    y_true = np.isin(np.arange(n), list(positives))
    y_score = np.empty(n)
    y_score[ranking] = -np.arange(n)  # score = -rank: no ties
    assert average_precision(ranking, positives) == pytest.approx(
        average_precision_score(y_true, y_score))


def test_mean_average_precision_and_stderr():
    m, se = mean_average_precision([[1, 2], [2, 1]], [{1}, {1}])
    assert m == pytest.approx(0.75)
    assert se == pytest.approx(np.std([1, 0.5], ddof=1) / np.sqrt(2))
    with pytest.raises(ValueError):
        mean_average_precision([[1]], [])


def test_recall_and_reciprocal_rank():
    assert recall_at_k([5, 3, 1, 0], {1, 0, 9}, 3) == pytest.approx(1 / 3)
    assert reciprocal_rank([5, 3, 1, 0], {1, 0}) == pytest.approx(1 / 3)
    assert reciprocal_rank([5, 3], {1}) == 0.0


def test_chance_reciprocal_rank_matches_simulation():
    rng = np.random.default_rng(0)
    n, p = 50, 3
    sims = [reciprocal_rank(rng.permutation(n), range(p)) for _ in range(20000)]
    assert chance_reciprocal_rank(n, p) == pytest.approx(np.mean(sims), rel=0.03)
    assert chance_reciprocal_rank(10, 10) == pytest.approx(1.0)
