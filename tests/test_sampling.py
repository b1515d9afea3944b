import numpy as np
import pytest

from fedsim.privacy.randomness import SecretRandomness
from fedsim.sampling import PoissonSampler


def sampler(n, q, seed=0, purpose="uls-cohort"):
    return PoissonSampler(n, q, SecretRandomness.from_seed(seed), purpose)


def test_cohort_size_has_binomial_mean_and_variance():
    n, q, rounds = 2000, 0.05, 3000
    s = sampler(n, q)
    sizes = np.array([len(s.sample(r)) for r in range(rounds)])
    mean, var = n * q, n * q * (1 - q)
    # standard errors: mean sqrt(var/R); variance ~ var*sqrt(2/R)
    assert abs(sizes.mean() - mean) < 5 * np.sqrt(var / rounds)
    assert abs(sizes.var() - var) < 5 * var * np.sqrt(2 / rounds)


def test_each_user_is_sampled_with_probability_q():
    n, q, rounds = 50, 0.2, 4000
    s = sampler(n, q, seed=1)
    counts = np.zeros(n)
    for r in range(rounds):
        ids = s.sample(r)
        assert np.all(np.diff(ids) > 0) and (ids.size == 0 or (ids[0] >= 0 and ids[-1] < n))
        counts[ids] += 1
    freq = counts / rounds
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q * (1 - q) / rounds))


def test_million_users_sampling_is_correct_over_chunks():
    s = sampler(3_000_000, 0.001, seed=2)  # spans two keystream chunks
    sizes = [len(s.sample(r)) for r in range(100)]
    assert abs(np.mean(sizes) - 3000) < 5 * np.sqrt(3000 / 100)
    ids = s.sample(0)
    assert ids[-1] < 3_000_000 and (ids >= 1 << 21).any()  # members beyond the first chunk are sampled


def test_reproducible_sample_is_a_function_of_seed_and_step():
    a, b = sampler(100, 0.3, seed=7), sampler(100, 0.3, seed=7)
    assert all(np.array_equal(a.sample(r), b.sample(r)) for r in range(10))
    assert not all(np.array_equal(a.sample(r), a.sample(r + 1)) for r in range(10))
    other = sampler(100, 0.3, seed=8)
    assert not all(np.array_equal(a.sample(r), other.sample(r)) for r in range(10))
    # the ULS cohort and the ELS sample of the same step are independent draws
    els = sampler(100, 0.3, seed=7, purpose="els-sample")
    assert not all(np.array_equal(a.sample(r), els.sample(r)) for r in range(10))


def test_secure_samplers_draw_different_cohorts():
    a = PoissonSampler(1000, 0.1, SecretRandomness.secure(), "uls-cohort")
    b = PoissonSampler(1000, 0.1, SecretRandomness.secure(), "uls-cohort")
    assert not np.array_equal(a.sample(1), b.sample(1))
    assert np.array_equal(a.sample(1), a.sample(1))  # one key, one step: one draw


@pytest.mark.parametrize("q", [0.0, 1.01, -0.1])
def test_invalid_rate_is_refused(q):
    with pytest.raises(ValueError):
        sampler(10, q)


def test_q_one_samples_everyone():
    assert len(sampler(10, 1.0).sample(1)) == 10


def test_bernoulli_threshold_never_exceeds_q():
    # member i joins iff word < floor(q 2^64): the rate that runs is <= the accounted q
    s = SecretRandomness.from_seed(0).stream("t", 0)
    words = SecretRandomness.from_seed(0).stream("t", 0).words(1000)
    q = 0.3
    idx = s.bernoulli_indices(1000, q)
    np.testing.assert_array_equal(idx, np.flatnonzero(words < np.uint64(int(q * 2.0**64))))
