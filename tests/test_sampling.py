import numpy as np
import pytest

from fedsim.errors import ConfigError
from fedsim.sampling import PoissonUserSampler


def test_cohort_size_has_binomial_mean_and_variance():
    n, q, rounds = 2000, 0.05, 3000
    s = PoissonUserSampler(n, q, seed=0)
    sizes = np.array([len(s.sample()) for _ in range(rounds)])
    mean, var = n * q, n * q * (1 - q)
    # standard errors: mean sqrt(var/R); variance ~ var*sqrt(2/R)
    assert abs(sizes.mean() - mean) < 5 * np.sqrt(var / rounds)
    assert abs(sizes.var() - var) < 5 * var * np.sqrt(2 / rounds)


def test_each_user_is_sampled_with_probability_q():
    n, q, rounds = 50, 0.2, 4000
    s = PoissonUserSampler(n, q, seed=1)
    counts = np.zeros(n)
    for _ in range(rounds):
        ids = s.sample()
        assert np.all(np.diff(ids) > 0) and (ids.size == 0 or (ids[0] >= 0 and ids[-1] < n))
        counts[ids] += 1
    freq = counts / rounds
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q * (1 - q) / rounds))


def test_million_users_sampling_is_fast_and_correct():
    s = PoissonUserSampler(1_000_000, 0.001, seed=2)
    sizes = [len(s.sample()) for _ in range(200)]
    assert abs(np.mean(sizes) - 1000) < 5 * np.sqrt(1000 / 200)


def test_seeded_sampler_is_reproducible_and_restorable():
    a, b = PoissonUserSampler(100, 0.3, seed=7), PoissonUserSampler(100, 0.3, seed=7)
    assert all(np.array_equal(a.sample(), b.sample()) for _ in range(10))
    st = a.state()
    x = a.sample()
    a.set_state(st)
    assert np.array_equal(a.sample(), x)


@pytest.mark.parametrize("q", [0.0, 1.01, -0.1])
def test_invalid_rate_is_refused(q):
    with pytest.raises(ConfigError):
        PoissonUserSampler(10, q)


def test_q_one_samples_everyone():
    assert len(PoissonUserSampler(10, 1.0).sample()) == 10
