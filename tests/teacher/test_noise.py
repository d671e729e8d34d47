"""Counter-based candidate noise (attribution/teacher/noise.py): a function of the key alone,
standard normal, independent across keys and elements."""

import numpy as np
import torch
from scipy import stats

from attribution.teacher.candidates import loss_plan
from attribution.teacher.noise import counter_normal, item_noise


def test_noise_is_a_function_of_the_key_alone():
    keys = loss_plan(torch.arange(7), 2, [0, 500, 999], flips=True)
    shape = (3, 5, 5)  # an odd element count
    whole = item_noise(keys, shape, seed=4)
    assert whole.shape == (len(keys), *shape) and whole.dtype == torch.float32
    one_by_one = torch.cat([item_noise(keys[i : i + 1], shape, seed=4) for i in range(len(keys))])
    assert torch.equal(whole, one_by_one)  # no dependence on batch size or position
    shuffled = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))
    assert torch.equal(item_noise(keys[shuffled], shape, seed=4), whole[shuffled])
    assert not torch.equal(item_noise(keys, shape, seed=5), whole)


def test_noise_is_standard_normal():
    keys = loss_plan(torch.arange(400), 1, [10, 20], flips=False)
    z = item_noise(keys, (4, 8, 8), seed=0).flatten().double().numpy()  # 204,800 values
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert abs(stats.skew(z)) < 0.02 and abs(stats.kurtosis(z)) < 0.05


def test_neighbouring_keys_and_elements_are_independent():
    n = 4000
    keys = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long),
                        torch.zeros(n, dtype=torch.long), torch.full((n,), 100)], 1)
    z = item_noise(keys, (64,), seed=1).double().numpy()
    limit = 4 / np.sqrt(z.size / 2)  # four standard errors of a correlation
    assert abs(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]) < limit  # items i, i+1
    assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < limit  # elements
    other_t = keys.clone()
    other_t[:, 3] = 101
    w = item_noise(other_t, (64,), seed=1).double().numpy()
    assert abs(np.corrcoef(z.ravel(), w.ravel())[0, 1]) < limit  # timestep t vs t+1
    pair = counter_normal(keys[:1], 2 * 10_000, seed=1).double().numpy()[0]
    # Box–Muller's two outputs of one pair are uncorrelated
    assert abs(np.corrcoef(pair[0::2], pair[1::2])[0, 1]) < 4 / np.sqrt(10_000)
