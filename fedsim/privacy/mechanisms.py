"""Noise mechanisms: clip each user's update (`constrain_sensitivity`), noise the sum
(`add_noise`), and describe a release to the accountants: one (`dp_event`), a Poisson-sampled
ULS round (`sampled_event`), an ELS step (`mixture_event`). A mechanism also names its default
accountant and builds itself from a budget (`calibrated`, like Opacus'
`make_private_with_epsilon`), so a new mechanism (LMO, ...) is a new subclass and nothing else
changes. As in pfl-research, the first verb runs per user, the second on the aggregate, and
both return `(result, metrics)`.

Sensitivity: with add/remove-one-user neighbours and every update clipped to L2 norm
C, the sum of clipped updates changes by at most C in L2.
"""

from __future__ import annotations

import abc
import functools
import math

import torch
from dp_accounting import dp_event

from fedsim.privacy import sabotage
from fedsim.privacy.accounting import UnsupportedEventError, check_positive
from fedsim.privacy.clipping import clip_factor, per_user_clip, update_norm  # noqa: F401 -- re-exported
from fedsim.privacy.randomness import NOISE_CHUNK, RandomStream, snap_to_grid


def binomial_pmf(k: int, q: float) -> list[float]:
    """[P(m) for m = 0..k], m ~ Binomial(k, q): how many of a user's k examples an ELS step samples."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (examples per user) must be an integer >= 1, got {k!r}")
    return [math.comb(k, m) * q**m * (1.0 - q) ** (k - m) for m in range(k + 1)]


def add_snapped(part: torch.Tensor, noise: torch.Tensor, grid_scale: float) -> None:
    """part <- snap(noise + part): one chunk of a release, the sum in float64 rounded to the grid of
    `grid_scale` (floating-point hardening, `privacy/randomness.py`). `noise` (float64, CPU) is
    consumed. Every mechanism's noise (independent or banded MF) reaches a release through here."""
    if sabotage.active("weak-noise"):  # the audit's self-test only (fedsim/privacy/sabotage.py)
        noise.div_(sabotage.WEAK_NOISE_FACTOR)
    y = noise.add_(part.detach().to("cpu", torch.float64))
    part.copy_(snap_to_grid(y, grid_scale))


class NoiseMechanism(abc.ABC):
    """One central-DP release of a sum of per-user updates clipped to `clip_norm`."""

    name: str = ""
    #: the accountant a run uses when its configured one cannot account for this mechanism
    default_accountant: str = "pld"
    #: the `dp.<key>` config entry that gives this mechanism's noise outright (`from_spec`)
    config_key: str = ""
    needs_dimension = False  # whether its accounting tightens with the number of noised coordinates
    #: users are split into this many fixed groups by id (u mod groups); round t samples only group
    #: (t - 1) mod groups, at `groups` times the ULS rate (cyclic Poisson sampling, banded MF). 1: plain Poisson
    participation_groups: int = 1

    @classmethod
    def from_spec(cls, clip_norm: float, spec, dimension: int | None = None) -> "NoiseMechanism | None":
        """The mechanism a config value gives outright; None when it is unset (calibrate instead)."""
        raise NotImplementedError

    def noise_label(self) -> str:
        """A short description of the noise, for tables: 'sigma=0.62', 'LMO std/C=1.1'."""
        return f"{self.name} std/C={self.noise_std() / self.clip_norm:.4g}"

    def group_privacy_epsilon(self, k: int, q: float, steps: int, delta: float) -> float | None:
        """ELS's classical alternative to its tight accountant (None: not available)."""
        return None

    @classmethod
    def probe(cls, clip_norm: float) -> "NoiseMechanism":
        """Some instance, to ask an accountant whether it supports this mechanism's releases."""
        raise NotImplementedError

    def __init__(self, clip_norm: float):
        if not clip_norm > 0:
            raise ValueError(f"clip norm must be positive, got {clip_norm!r}")
        self.clip_norm = float(clip_norm)

    def participation_group(self, step: int) -> int | None:
        """The user group that round `step` samples (recorded in the ledger), None without groups."""
        return (step - 1) % self.participation_groups if self.participation_groups > 1 else None

    def noise_process(self, randomness, purpose: str) -> IndependentNoise:
        """The noise of one run's releases, step by step: `add(aggregate, step)`. Independent noise
        here (a pure function of the keystream (purpose, step)); correlated noise keeps a state."""
        return IndependentNoise(self, randomness, purpose)

    def constrain_sensitivity(self, update: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Clip one user's update (in place) to L2 norm <= C."""
        update, norm = per_user_clip(update, self.clip_norm)
        return update, {"norm_before_clip": norm, "clipped": float(norm > self.clip_norm)}

    @abc.abstractmethod
    def sample_noise(self, stream: RandomStream, n: int) -> torch.Tensor:
        """n noise values (float64, CPU) for a sum of clipped updates, already scaled by C,
        drawn from `stream` (a `SecretRandomness` keystream: the only source of noise)."""

    def add_noise(self, aggregate: torch.Tensor, stream: RandomStream) -> tuple[torch.Tensor, dict]:
        """Add noise to the (clipped) sum, in place: per chunk, noise + sum in float64, rounded
        to a grid of 2^-16 noise std (floating-point hardening, `privacy/randomness.py`), cast
        back. Chunks keep the extra memory O(chunk) for any number of coordinates.

        Returns (aggregate, released metrics): the noise std and the expected noise norm
        std * sqrt(d) (root-mean-square), never the realised noise or signal norm."""
        flat = aggregate.view(-1)
        std, grid_scale = self.noise_std(), self.grid_scale()
        released = {"noise_std": std, "expected_noise_norm": std * math.sqrt(flat.numel())}
        if grid_scale == 0:  # non-private reference run: nothing to draw
            return aggregate, released
        for start in range(0, flat.numel(), NOISE_CHUNK):
            part = flat[start:start + NOISE_CHUNK]
            add_snapped(part, self.sample_noise(stream, part.numel()), grid_scale)
        return aggregate, released

    @abc.abstractmethod
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise on the sum."""

    def adapt_clip(self, unclipped: int, contributions: int, stream: RandomStream) -> dict:
        """After a release: move `clip_norm` from the round's count of contributions within it
        (adaptive clipping, `privacy/adaptive_clipping.py`); returns released metrics. A fixed
        clip releases nothing and draws nothing."""
        return {}

    def state_dict(self) -> dict:
        """The mechanism's public state that changes during a run (checkpointed); {} if none."""
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore `state_dict()` (None: the start of a run)."""

    def grid_scale(self) -> float:
        """A finite, positive scale of the noise (0: no noise) that sets the rounding grid of
        `add_noise`; the std unless a mechanism's std can be infinite."""
        return self.noise_std()

    @abc.abstractmethod
    def dp_event(self) -> dp_event.DpEvent:
        """One (unsampled) release of a sensitivity-C sum, for the accountants."""

    def sampled_event(self, q: float) -> dp_event.DpEvent:
        """One ULS round: the release over a Poisson(q) cohort of users."""
        event = self.dp_event()
        if isinstance(event, (dp_event.NonPrivateDpEvent, dp_event.NoOpDpEvent)):
            return event
        return dp_event.PoissonSampledDpEvent(q, event)

    def mixture_event(self, k: int, q: float) -> dp_event.DpEvent:
        """One ELS step for one user holding k examples, each Poisson(q)-sampled: the release
        shifts by m C with m ~ Binomial(k, q)."""
        raise UnsupportedEventError(f"no user-level ELS (mixture) accounting for {self.name} noise")

    def run_event(self, q: float, steps: int, k: int | None = None) -> dp_event.DpEvent:
        """`steps` ULS rounds (k None) or ELS steps (k examples per user) with sampling rate q."""
        one = self.sampled_event(q) if k is None else self.mixture_event(k, q)
        return dp_event.SelfComposedDpEvent(one, steps)

    def describe(self) -> dict:
        return {"mechanism": self.name, "clip_norm": self.clip_norm, "noise_std": self.noise_std()}


class GaussianMechanism(NoiseMechanism):
    """z ~ N(0, (sigma C)^2 I) added to the sum; the noise multiplier is sigma = std / C."""

    name = "gaussian"

    def __init__(self, clip_norm: float, noise_multiplier: float):
        super().__init__(clip_norm)
        if noise_multiplier != 0:
            check_positive(noise_multiplier, "noise_multiplier")
        self.noise_multiplier = float(noise_multiplier)

    config_key = "noise_multiplier"

    @classmethod
    def probe(cls, clip_norm: float) -> "GaussianMechanism":
        return cls(clip_norm, 1.0)

    @classmethod
    def from_spec(cls, clip_norm: float, spec, dimension: int | None = None) -> "GaussianMechanism | None":
        return None if spec is None else cls(clip_norm, spec)

    def noise_label(self) -> str:
        return f"sigma={self.noise_multiplier:.4g}"

    def group_privacy_epsilon(self, k: int, q: float, steps: int, delta: float) -> float | None:
        """Group privacy over the example-level guarantee (`privacy/els_accounting.py`)."""
        if self.noise_multiplier == 0:
            return None
        from fedsim.privacy.els_accounting import group_privacy_epsilon

        return group_privacy_epsilon(self.noise_multiplier, k, q, steps, delta).epsilon

    @classmethod
    def calibrated(cls, clip_norm: float, *, target_epsilon: float, delta: float, q: float, steps: int,
                   k: int | None = None, accountant: str = "pld", dimension: int | None = None, cache=None,
                   **options) -> "GaussianMechanism":
        """The least noise (to 0.1%, never less) whose `steps` releases meet (target_epsilon,
        delta) under the named accountant: ULS rounds, or ELS steps when k is given (the k = 1
        answer, times sqrt(k), seeds the slower mixture search). `dimension` does not matter
        for Gaussian noise, and a calibration takes seconds: no `cache` is used."""
        from fedsim.privacy.accounting import make_accountant
        from fedsim.privacy.calibration import calibrate_noise

        guess = None
        if k is not None and k > 1:  # the k = 1 answer to 5%, times sqrt(k)
            guess = calibrate_noise(lambda s: cls(clip_norm, s).run_event(q, steps), target_epsilon, delta,
                                    lambda: make_accountant(accountant, **options), guess=1.0, rtol=0.05,
                                    factor=2.0) * math.sqrt(k)
        sigma = calibrate_noise(lambda s: cls(clip_norm, s).run_event(q, steps, k), target_epsilon, delta,
                                lambda: make_accountant(accountant, **options), guess=guess,
                                rtol=1e-3 if k is None else 5e-3)
        return cls(clip_norm, sigma)

    def sample_noise(self, stream: RandomStream, n: int) -> torch.Tensor:
        return stream.normal(n).mul_(self.noise_multiplier * self.clip_norm)

    def noise_std(self) -> float:
        # sigma = 0 with an unbounded clip (the non-private reference): no noise, not 0 * inf = nan
        return self.noise_multiplier * self.clip_norm if self.noise_multiplier else 0.0

    def dp_event(self) -> dp_event.DpEvent:
        if self.noise_multiplier == 0:
            return dp_event.NonPrivateDpEvent()
        return dp_event.GaussianDpEvent(self.noise_multiplier)

    def mixture_event(self, k: int, q: float) -> dp_event.DpEvent:
        """The mixture of Gaussians N(m, sigma^2), m ~ Binomial(k, q) (Charles et al. 2024,
        arXiv 2407.07737, Sec. 3; its PLD from Ganesh 2023, arXiv 2310.15526); with k = 1 the
        Poisson-subsampled Gaussian."""
        if self.noise_multiplier == 0:
            return dp_event.NonPrivateDpEvent()
        return dp_event.MixtureOfGaussiansDpEvent(
            standard_deviation=self.noise_multiplier, sensitivities=[float(m) for m in range(k + 1)],
            sampling_probs=binomial_pmf(k, q))

    def describe(self) -> dict:
        return {**super().describe(), "noise_multiplier": self.noise_multiplier}


class IndependentNoise:
    """Fresh noise per release: step t's noise comes from the keystream (purpose, t) alone."""

    def __init__(self, mechanism: NoiseMechanism, randomness, purpose: str):
        self.mechanism, self.randomness, self.purpose = mechanism, randomness, purpose

    def add(self, aggregate: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        return self.mechanism.add_noise(aggregate, self.randomness.stream(self.purpose, step))


class BandedMFMechanism(GaussianMechanism):
    """Banded matrix-factorization noise (DP-FTRL / BandMF) with cyclic Poisson sampling of users:
    round t releases sum_t + sigma C (C_s^{-1} Z)_t for a b-banded Toeplitz strategy C_s with max
    column norm 1, and samples only user group (t - 1) mod b, each member with p = b q. Accounted as
    ceil(T / b) compositions of PoissonSampled(p, Gaussian(sigma)) (Choquette-Choo et al. 2023,
    arXiv 2306.08153, Sec. 5, Theorem 1; threat model and argument in `fedsim/privacy/banded_mf.py`).
    b = 1 is `GaussianMechanism` exactly: the same cohorts, noise, events and epsilon.

    The strategy is bound to a run's shape by `configured(bands=, strategy=, rounds=)`, a subclass
    the plan builds from `dp.banded_mf`; ULS only (ELS has no banded accounting here)."""

    name = "banded_mf"
    bands: int = 1
    strategy_kind: str = "sqrt"
    rounds: int = 1

    @classmethod
    def configured(cls, *, bands: int, strategy: str, rounds: int) -> type[BandedMFMechanism]:
        from fedsim.privacy.banded_mf import STRATEGIES, check_bands

        check_bands(bands, rounds)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        return type(f"BandedMF{bands}{strategy.capitalize()}", (cls,),
                    {"bands": int(bands), "strategy_kind": strategy, "rounds": int(rounds),
                     "participation_groups": int(bands), "__doc__": cls.__doc__})

    @property
    def strategy(self):
        """The `BandedStrategy` (built once per (bands, kind, rounds): the optimised one solves a small L-BFGS)."""
        return _strategy(self.bands, self.strategy_kind, self.rounds)

    def noise_label(self) -> str:
        return f"banded MF b={self.bands} ({self.strategy_kind}), sigma={self.noise_multiplier:.4g}"

    def group_privacy_epsilon(self, k: int, q: float, steps: int, delta: float) -> float | None:
        return None

    def sampled_event(self, q: float) -> dp_event.DpEvent:
        """One round of one group: PoissonSampled(p = b q, Gaussian(sigma))."""
        from fedsim.privacy.banded_mf import participation_rate

        return super().sampled_event(participation_rate(q, self.bands))

    def mixture_event(self, k: int, q: float) -> dp_event.DpEvent:
        raise UnsupportedEventError("banded MF noise is a ULS mechanism here (no ELS user-level accounting)")

    def run_event(self, q: float, steps: int, k: int | None = None) -> dp_event.DpEvent:
        """`steps` rounds: ceil(steps / b) compositions of `sampled_event(q)` (each user is in one group)."""
        from fedsim.privacy.banded_mf import participations

        if k is not None:
            return self.mixture_event(k, q)
        return dp_event.SelfComposedDpEvent(self.sampled_event(q), participations(steps, self.bands))

    def noise_process(self, randomness, purpose: str):
        from fedsim.privacy.banded_mf import BandedNoise

        return BandedNoise(self.strategy, self.noise_multiplier * self.clip_norm if self.noise_multiplier else 0.0,
                           self.grid_scale(), randomness, purpose)

    def describe(self) -> dict:
        out = {**super().describe(), "bands": self.bands, "strategy": self.strategy_kind, "strategy_rounds": self.rounds,
               "participation": f"cyclic Poisson: group (t - 1) mod {self.bands} of users u mod {self.bands}"}
        if self.noise_multiplier:
            out["strategy_coefficients"] = list(self.strategy.coefficients)
        return out


@functools.lru_cache(maxsize=16)
def _strategy(bands: int, kind: str, rounds: int):
    from fedsim.privacy.banded_mf import BandedStrategy

    return BandedStrategy.build(bands, kind, rounds)
