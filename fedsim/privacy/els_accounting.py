"""User-level privacy of ELS (example-level sampling DP-SGD), tight and by group privacy.

ELS caps each user at k examples and Poisson-samples every example with rate q per step.
A user is then present in a step through m ~ Binomial(k, q) of its examples, and the
step's noisy sum of per-example gradients (each clipped to C, noise N(0, (sigma C)^2 I))
shifts by at most m C. With add/remove-one-user neighbours one step is the
mixture-of-Gaussians mechanism

    D  -> N(0, sigma^2),     D' -> sum_m Binom(m; k, q) N(m, sigma^2)

(Charles et al. 2024, arXiv 2407.07737, Sec. 3 "a tight user-level accountant for ELS";
the mechanism and its PLD are from Ganesh 2023, arXiv 2310.15526), and T steps are its
T-fold composition. dp_accounting 0.6 has the event
(`dp_event.MixtureOfGaussiansDpEvent`) and its privacy-loss distribution; its RDP
accountant refuses it. With k = 1 the mixture is the Poisson-subsampled Gaussian.

The event is `GaussianMechanism.mixture_event(k, q)`, accounted by ``pld``. Building a
mixture PLD takes ~1 s at interval 1e-2 and ~10 s at 1e-3 (any T); every interval is an
upper bound, a coarser one looser (the q=0.01, sigma=1, T=1000, k=4 reference: 10.0412 at
1e-2, 10.0156 at 1e-3). ELS runs use 1e-2 (`els.accounting_interval`).

`group_privacy_epsilon` is the classical alternative printed beside the tight value: the
example-level (eps0, delta0) of the Poisson-subsampled Gaussian, turned into a guarantee
for a group of k examples by group privacy (Vadhan 2017, "The Complexity of
Differential Privacy", Lemma 2.2: an (eps, delta)-DP mechanism is
(k eps, k e^{(k-1) eps} delta)-DP for groups of size k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dp_accounting import dp_event
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from fedsim.privacy.accounting import check_delta, epsilon, pld_accountant
from fedsim.privacy.calibration import find_boundary
from fedsim.privacy.mechanisms import GaussianMechanism

#: default PLD discretisation for ELS accounting (see the module docstring for the trade-off)
DEFAULT_INTERVAL = 1e-2


def els_event(noise_multiplier: float, k: int, q: float, steps: int) -> dp_event.DpEvent:
    """T ELS steps with Gaussian noise multiplier sigma: the user-level event of a run."""
    return GaussianMechanism(1.0, noise_multiplier).run_event(q, steps, k)


def els_epsilon(noise_multiplier: float, k: int, q: float, steps: int, delta: float,
                interval: float = DEFAULT_INTERVAL) -> float:
    """Tight user-level epsilon of T ELS steps (PLD of the Binomial(k, q) mixture)."""
    return epsilon(pld_accountant(interval), els_event(noise_multiplier, k, q, steps), delta)


def calibrate_els_noise(k: int, q: float, steps: int, target_epsilon: float, delta: float,
                        interval: float = DEFAULT_INTERVAL) -> float:
    """Smallest sigma (to 0.5%, rounded up) whose T ELS steps meet the user-level target."""
    return GaussianMechanism.calibrated(1.0, target_epsilon=target_epsilon, delta=delta, q=q, steps=steps, k=k,
                                        value_discretization_interval=interval).noise_multiplier


@dataclass(frozen=True)
class GroupPrivacyBound:
    """User-level (epsilon, delta) of ELS by group privacy over the example-level guarantee."""

    epsilon: float  # k * example_epsilon
    delta: float  # k e^{(k-1) example_epsilon} example_delta  (<= the requested user delta)
    example_epsilon: float
    example_delta: float
    k: int


def group_privacy_epsilon(noise_multiplier: float, k: int, q: float, steps: int, delta: float,
                          interval: float = 1e-3) -> GroupPrivacyBound:
    """The group-privacy user-level bound for T Poisson(q)-subsampled Gaussian steps.

    Vadhan 2017, Lemma 2.2: (eps0, delta0)-DP for one example implies
    (k eps0, k e^{(k-1) eps0} delta0)-DP for k examples. We look for the largest example
    delta0 with k e^{(k-1) eps0(delta0)} delta0 <= delta (eps0 falls as delta0 grows, so the
    largest feasible delta0 gives the smallest user epsilon), by halving from delta / k and
    then bisection to 1e-4 relative. Any feasible delta0 gives a valid bound; the search only
    makes it small. When no delta0 down to 2^-110 delta / k is feasible the bound is infinite.
    """
    check_delta(delta)
    one = pld_lib.from_gaussian_mechanism(standard_deviation=noise_multiplier, sampling_prob=q,
                                          value_discretization_interval=interval).self_compose(steps)

    def user_delta(d0: float) -> tuple[float, float]:
        e0 = float(one.get_epsilon_for_delta(d0))
        return k * math.exp(min((k - 1) * e0, 700.0)) * d0, e0

    hi = delta / k  # k e^{...} d0 >= k d0, so d0 <= delta / k
    d0 = find_boundary(lambda d: user_delta(d)[0] <= delta, hi, larger_passes=False, rtol=1e-4,
                       bounds=(hi * 2.0**-110, hi))
    if d0 is None:  # e^{(k-1) eps0} outgrows every delta0 the PLD resolves: no finite bound
        return GroupPrivacyBound(epsilon=math.inf, delta=delta, example_epsilon=math.inf, example_delta=0.0, k=k)
    ud, e0 = user_delta(d0)
    return GroupPrivacyBound(epsilon=k * e0, delta=ud, example_epsilon=e0, example_delta=d0, k=k)
