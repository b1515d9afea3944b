"""Banded matrix-factorization (BandMF) noise for ULS: the strategy, the participation schema it
needs, its accounting event and its O(b d)-memory noise process.

The mechanism
-------------
Write the clipped sums of T rounds as the rows of X (T x d). The matrix mechanism releases
Cx + sigma C_clip Z (Z i.i.d. standard normal, C a lower-triangular T x T "strategy") and the
training loop uses the rows of

    X_hat = C^{-1} (C X + sigma C_clip Z) = X + sigma C_clip C^{-1} Z,

i.e. round t releases x_t + sigma C_clip (C^{-1} Z)_t: DP-FTRL / DP-MF noise, correlated across
rounds so that prefix sums (what SGD-like optimisers accumulate) see less of it (Denisov et al.
2022; Choquette-Choo et al., "Multi-Epoch Matrix Factorization Mechanisms for Private Machine
Learning", arXiv 2211.06530). X_hat is a function of C X + Z, so everything fedsim releases is
post-processing of the matrix mechanism's output.

fedsim uses b-banded lower-triangular *Toeplitz* strategies: C[t, s] = c_{t-s} for
0 <= t - s < b, else 0 (b = `bands`; b = 1 gives C = I, DP-FedAvg). Two choices of c:

* ``sqrt``: the banded square root (Kalinin and Lampert, "Banded Square Root Matrix
  Factorization for Differentially Private Model Training", NeurIPS 2024): the coefficients
  of (1 - x)^{-1/2}, c_k = binom(2k, k) / 4^k (the Toeplitz square root of the prefix-sum
  matrix A), truncated to b bands;
* ``optimized``: the banded Toeplitz strategy minimising the prefix-sum error
  ||A C^{-1}||_F^2 max_col_norm(C)^2 over its b coefficients (McKenna, "Scaling up the Banded
  Matrix Factorization Mechanism for Differentially Private ML", arXiv 2405.15913, Sec. 3:
  with Toeplitz C every quantity is O(T b)); L-BFGS from the banded square root, never worse
  than it.

Both are scaled so that the maximum column norm (the sensitivity) zeta = ||c||_2 = 1.

Noise with O(b d) memory: with w = C^{-1} z, C w = z is solved forward one round at a time,

    w_t = (z_t - sum_{j=1}^{b-1} c_j w_{t-j}) / c_0,

so only the last b - 1 vectors w are kept (`BandedNoise`).

Participation schema: cyclic Poisson sampling
---------------------------------------------
Users are split into b fixed groups by user index, group(u) = u mod b: public and fixed before
training, independent of the data. Round t (1-based) samples only group (t - 1) mod b, each
member independently with probability p = b q, q the configured ULS rate, so the expected cohort
is still about q N (the compute of DP-FedAvg). A user's rounds are therefore at least b apart
(b-min-separation) and a user takes part in at most ceil(T / b) rounds. (Choquette-Choo et al.,
"(Amplified) Banded Matrix Factorization: A unified approach to private training", NeurIPS 2023,
arXiv 2306.08153, Sec. 5, Algorithm 2.)

Threat model and the amplification result
-----------------------------------------
Central DP with a trusted server; each user's update clipped to L2 norm C_clip. Neighbours: one
user's data present or absent *in a fixed slot* of a public roster of N users ("zero-out"
adjacency, as dp_accounting's `truncated_amplified_bandmf_event` states it): every other user
keeps its index, hence its group. This is narrower than add/remove that renumbers the population.
A user's index is its rank among the kept users (sorted ids, users below data.min_examples
dropped), so inserting a user that sorts first moves every later user to the next group: with
b = 2 and p = 1, round 1 then sums the other half of the population, a change far above C_clip
(N = 10 users with updates +1, -1, +1, ...: round 1's sum goes from +5 to -5). The Poisson
sampler (b = 1) has no groups, so its add/remove guarantee is unaffected; fedsim already treats
N as public (q = expected cohort / N). The adversary sees the whole released sequence (the noisy sums of every
round, hence every model), knows the strategy C, the group of every user, sigma, p and the
public seeds; it does not see which members of a round's group were sampled, nor the noise
(both drawn from the run's `SecretRandomness`). Inputs may be chosen adaptively: the sum of
round t may depend on every earlier release.

Theorem (Choquette-Choo et al. 2023, Sec. 5, Theorem 1; also McKenna 2024, Prop. 2.1): with
cyclic Poisson sampling over b groups and a b-banded lower-triangular C whose columns have
norm <= 1, the matrix mechanism satisfies every privacy guarantee of DP-SGD (the
Poisson-subsampled Gaussian with sampling probability p and noise multiplier sigma) run for
ceil(T / b) rounds, under adaptive composition.

Why (the argument the accounting relies on, so it can be checked here): a user u of group g
contributes only to rounds r_k = g + 1 + k b. Its contribution to round r_k moves only rows
r_k .. r_k + b - 1 of C X (column r_k of C has its b nonzeros there), and these blocks of rows
are disjoint for k = 0, 1, ...; no other round of the block holds u. Given everything
released before a block, the block's rows are a bijection of
1[u sampled] C[block, r_k] Delta_u + sigma C_clip Z_block with ||C[:, r_k]|| ||Delta_u|| <= C_clip:
one Poisson(p)-subsampled Gaussian with noise multiplier sigma. (The bijection is causal, not fixed
by the history before the block alone: the other users' sums in the block's later rounds depend on
its earlier rows, so row j minus the part that the history up to row j - 1 determines is the j-th
row of the vector above; the map and its inverse are computed row by row without u's coin.) The blocks form an adaptive
composition of at most ceil(T / b) of them (fewer for a group whose first round is later).

`amplified_event` writes this as dp_accounting events, so PLD, RDP, PRV and Edgeworth apply;
at b = 1 it *is* DP-FedAvg's event. The ledger records each round's group, and epsilon is that
of the group with the most recorded participations (`fedsim/privacy/ledger.py`).

Resuming
--------
Reproducible mode: the noise of round t is a pure function of the key, so a resumed run
re-draws z_1 .. z_{t-1} and rebuilds the state bit for bit (cost O(t d) once). Secure mode:
the key is fresh per process, the old z are gone and the state is never written anywhere, so a
resumed run *restarts the correlation* at its first round r: w_s = 0 for s < r. Rounds r..T
then use the lower-right principal block of C, again b-banded with columns of norm <= 1: a
second BandMF mechanism on the same groups, composed adaptively with the first (rounds < r and
the crashed attempt at r). The argument above applies to each, so a user's cost is the number of
its group's rounds across both, which is exactly what the ledger holds: the redone round is
recorded again for its group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from dp_accounting import dp_event

STRATEGIES = ("sqrt", "optimized")
_REJECT = 1e4  # log-error of an unstable strategy: e^(1e4) is above any stable one


# -- the strategy -----------------------------------------------------------------------------------


def sqrt_coefficients(bands: int) -> np.ndarray:
    """c_k = binom(2k, k) / 4^k for k < bands (the Toeplitz coefficients of A^{1/2}, A the prefix-sum
    matrix: (1 - x)^{-1/2} = sum_k binom(2k, k) (x / 4)^k), unnormalised. c_0 = 1."""
    check_bands(bands)
    c = np.ones(bands)
    for k in range(1, bands):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)
    return c


def normalized(c: np.ndarray) -> np.ndarray:
    """c scaled to ||c||_2 = 1 (the maximum column norm of a b-banded Toeplitz C with T >= b) and c_0 > 0."""
    c = np.asarray(c, dtype=np.float64)
    norm = math.sqrt(float(np.dot(c, c)))
    if not (norm > 0 and c[0] != 0):
        raise ValueError("a strategy needs c_0 != 0 (C invertible)")
    return c / (norm if c[0] > 0 else -norm)


def check_bands(bands: int, rounds: int | None = None) -> None:
    if isinstance(bands, bool) or not isinstance(bands, (int, np.integer)) or bands < 1:
        raise ValueError(f"bands must be an integer >= 1, got {bands!r}")
    if rounds is not None and bands > rounds:
        raise ValueError(f"bands={bands} is larger than the {rounds} rounds")


def inverse_coefficients(c: np.ndarray, n: int) -> np.ndarray:
    """The first n coefficients d of 1 / c(x): C^{-1} is the lower-triangular Toeplitz matrix of d
    (O(n b): d_0 = 1 / c_0, d_k = -sum_{j=1}^{min(k, b-1)} c_j d_{k-j} / c_0)."""
    from scipy.signal import lfilter

    impulse = np.zeros(n)
    impulse[0] = 1.0
    return lfilter([1.0], np.asarray(c, dtype=np.float64), impulse)


def strategy_matrix(c: np.ndarray, n: int) -> np.ndarray:
    """The dense n x n b-banded lower-triangular Toeplitz C (tests and small n only)."""
    out = np.zeros((n, n))
    for k, ck in enumerate(np.asarray(c)[:n]):
        out += np.diag(np.full(n - k, ck), -k)
    return out


def max_column_norm(c: np.ndarray, n: int) -> float:
    """zeta = max column norm of the n x n strategy: ||c[:n]|| (the first column holds every band)."""
    return float(np.linalg.norm(np.asarray(c)[:n]))


def prefix_sum_error(c: np.ndarray, n: int) -> float:
    """||A C^{-1}||_F^2 zeta^2, A the n x n prefix-sum matrix: A C^{-1} is Toeplitz with coefficients
    e = cumsum(d), so ||A C^{-1}||_F^2 = sum_k (n - k) e_k^2 (total squared error of the n noisy
    prefix sums, per unit of sigma, at sensitivity zeta)."""
    e = np.cumsum(inverse_coefficients(c, n))
    return float(np.dot(np.arange(n, 0, -1), e * e)) * max_column_norm(c, n) ** 2


def _log_error_and_grad(c: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """log(F S) and its gradient, F = sum_k (n-k) e_k^2, S = ||c||^2. With d = 1/c(x),
    dd/dc_j = -x^j / c(x)^2, so de_k/dc_j = -E2_{k-j}, E2 = cumsum of the coefficients of 1/c(x)^2."""
    from scipy.signal import lfilter

    impulse = np.zeros(n)
    impulse[0] = 1.0
    weights = np.arange(n, 0, -1, dtype=np.float64)
    with np.errstate(all="ignore"):  # an unstable c (1/c(x) growing geometrically) overflows: rejected below
        e = np.cumsum(lfilter([1.0], c, impulse))
        f = float(np.dot(weights, e * e))
        s = float(np.dot(c, c))
        e2 = np.cumsum(lfilter([1.0], np.convolve(c, c), impulse))
        g = 2.0 * weights * e
        df = np.array([-np.dot(g[j:], e2[:n - j]) for j in range(c.size)])
        grad = df / f + 2.0 * c / s
    if not (math.isfinite(f) and f > 0 and s > 0 and np.all(np.isfinite(grad))):
        return _REJECT, np.zeros_like(c)  # far above any stable point: the line search steps back
    return math.log(f) + math.log(s), grad


def optimized_coefficients(bands: int, rounds: int, iters: int = 500) -> np.ndarray:
    """The b-banded Toeplitz strategy minimising `prefix_sum_error` for `rounds` rounds (normalised);
    the banded square root if the optimiser does not improve on it."""
    from scipy.optimize import minimize

    check_bands(bands, rounds)
    start = normalized(sqrt_coefficients(bands))
    if bands == 1:
        return start
    res = minimize(_log_error_and_grad, start, args=(rounds,), jac=True, method="L-BFGS-B",
                   options={"maxiter": iters})
    best = normalized(res.x) if np.all(np.isfinite(res.x)) and res.x[0] != 0 else start
    return best if prefix_sum_error(best, rounds) < prefix_sum_error(start, rounds) else start


@dataclass(frozen=True)
class BandedStrategy:
    """A b-banded lower-triangular Toeplitz strategy C with max column norm 1, for `rounds` rounds."""

    bands: int
    kind: str  # "sqrt" or "optimized"
    rounds: int
    coefficients: tuple[float, ...] = field(repr=False)

    @classmethod
    def build(cls, bands: int, kind: str, rounds: int) -> BandedStrategy:
        check_bands(bands, rounds)
        if kind not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {kind!r}")
        c = normalized(sqrt_coefficients(bands)) if kind == "sqrt" else optimized_coefficients(bands, rounds)
        return cls(bands, kind, rounds, tuple(float(x) for x in c))

    def noise_std_factors(self, n: int) -> np.ndarray:
        """||row k of C^{-1}||_2 for k < n: the per-coordinate std of round k's noise (k rounds into a
        segment), in units of sigma C_clip."""
        d = inverse_coefficients(np.array(self.coefficients), n)
        return np.sqrt(np.cumsum(d * d))

    def error(self) -> float:
        return prefix_sum_error(np.array(self.coefficients), self.rounds)


# -- accounting -------------------------------------------------------------------------------------


def participation_rate(q: float, bands: int) -> float:
    """p = b q: the in-group sampling probability that keeps the expected cohort at q N."""
    check_bands(bands)
    p = bands * q
    if not 0 < p <= 1:
        raise ValueError(f"the in-group sampling rate p = bands x q = {bands} x {q:.4g} = {p:.4g} must be in (0, 1];"
                         " lower the bands or the expected cohort")
    return p


def participations(rounds: int, bands: int) -> int:
    """ceil(T / b): the most rounds any one group (hence user) takes part in."""
    return -(-int(rounds) // int(bands))


def amplified_event(q: float, noise_multiplier: float, rounds: int, bands: int) -> dp_event.DpEvent:
    """T rounds of BandMF with b bands under cyclic Poisson sampling (the theorem in the module
    docstring): ceil(T / b) compositions of PoissonSampled(p = b q, Gaussian(sigma)). At b = 1,
    DP-FedAvg's SelfComposed(PoissonSampled(q, Gaussian(sigma)), T)."""
    one = dp_event.PoissonSampledDpEvent(participation_rate(q, bands), dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SelfComposedDpEvent(one, participations(rounds, bands))


# -- the noise process --------------------------------------------------------------------------------


class BandedNoise:
    """The noise of one run: round t releases aggregate_t + scale (C^{-1} z)_t, z_t the keystream
    (purpose, t), per coordinate chunk exactly like `NoiseMechanism.add_noise` (the same normals in
    the same order, then snapped to the same grid), so b = 1 is DP-FedAvg's noise bit for bit.

    Holds w_{t-1}, ..., w_{t-b+1} (float64, (b - 1) d values). A call for a round other than the
    next one (a resume) rebuilds the state: by re-drawing every earlier round of the segment in
    reproducible mode, by restarting the correlation there in secure mode (module docstring)."""

    def __init__(self, strategy: BandedStrategy, scale: float, grid_scale: float, randomness, purpose: str):
        self.c = [float(x) for x in strategy.coefficients]
        self.strategy, self.scale, self.grid_scale = strategy, float(scale), float(grid_scale)
        self.randomness, self.purpose = randomness, purpose
        self.segment_start = 1  # the first round of the current correlation segment
        self.next_step = 1
        self.state = None  # torch (b - 1, d) float64 ring buffer, slot k mod (b - 1) holds w of segment round k
        self._std = strategy.noise_std_factors(strategy.rounds)
        self.restarts: list[int] = []  # rounds where a secure resume restarted the correlation

    @property
    def memory_bytes(self) -> int:
        return 0 if self.state is None else self.state.numel() * 8

    def _correlated(self, step: int, chunk_z, start: int):
        """w_t on coordinates [start, start + n) from z_t there; updates the ring buffer."""
        b, k = len(self.c), step - self.segment_start
        w = chunk_z
        n = w.numel()
        for j in range(1, min(b - 1, k) + 1):
            w.sub_(self.state[(k - j) % (b - 1), start:start + n], alpha=self.c[j])
        if self.c[0] != 1.0:
            w.div_(self.c[0])
        if b > 1:
            self.state[k % (b - 1), start:start + n].copy_(w)
        return w

    def _draw(self, step: int, d: int):
        """(start, w chunk) for every chunk of round `step`, in order, advancing the state."""
        import torch

        from fedsim.privacy.randomness import NOISE_CHUNK

        if len(self.c) > 1 and (self.state is None or self.state.shape[1] != d):
            self.state = torch.zeros(len(self.c) - 1, d, dtype=torch.float64)
        stream = self.randomness.stream(self.purpose, step)
        for start in range(0, d, NOISE_CHUNK):
            n = min(NOISE_CHUNK, d - start)
            yield start, self._correlated(step, stream.normal(n), start)
        self.next_step = step + 1

    def _resync(self, step: int, d: int) -> None:
        if self.randomness.reproducible:  # the same key: replay the segment's earlier rounds
            self.segment_start, self.state = 1, None
            for s in range(1, step):
                for _ in self._draw(s, d):
                    pass
        else:  # a fresh key: restart the correlation at `step` (never re-create old noise)
            self.segment_start, self.state = step, None
            self.restarts.append(step)
        self.next_step = step

    def add(self, aggregate, step: int):
        """Add round `step`'s noise to `aggregate` in place; returns (aggregate, released metrics)."""
        from fedsim.privacy.mechanisms import add_snapped

        flat = aggregate.view(-1)
        d = flat.numel()
        k = step - self.segment_start if step == self.next_step else None
        if k is None:
            self._resync(step, d)
            k = step - self.segment_start
        std = self.scale * float(self._std[min(k, self._std.size - 1)])
        released = {"noise_std": std, "expected_noise_norm": std * math.sqrt(d), "mf_segment_round": k + 1}
        if self.grid_scale == 0:  # non-private reference run: nothing to draw
            self.next_step = step + 1
            return aggregate, released
        for start, w in self._draw(step, d):
            # w's copy for later rounds is already in the ring buffer: scale this one in place
            add_snapped(flat[start:start + w.numel()], w.mul_(self.scale), self.grid_scale)
        return aggregate, released
