"""Privacy accountants behind one interface: a DpEvent and delta in, an epsilon out.

Every release fedsim makes is described by a `dp_accounting.dp_event.DpEvent` (the
ledger stores them). An `Accountant` turns a (composed) event into epsilon for a delta,
or delta for an epsilon. Backends:

* ``pld`` -- dp_accounting's privacy-loss-distribution accountant (pessimistic
  discretisation, so the result is an upper bound up to the connect-the-dots
  construction of Doroshenko et al., arXiv 2207.04380). The default: tightest bound.
* ``rdp`` -- dp_accounting's Renyi-DP accountant (Mironov 2017; subsampled Gaussian
  by Mironov, Talwar, Zhang 2019). An upper bound, looser than PLD.
* ``prv`` and ``edgeworth`` -- see `fedsim.privacy.prv` and `fedsim.privacy.edgeworth`.

Only accountants with ``is_upper_bound = True`` may report "the" epsilon of a run.

This is where a run's epsilon is computed: `compute_epsilon(ledger_event, delta, name)`.
"""

from __future__ import annotations

import abc
import functools
import logging
import math
from collections.abc import Callable

from dp_accounting import dp_event
from dp_accounting import privacy_accountant as dpa
from dp_accounting.rdp import rdp_privacy_accountant

from fedsim.compat import memoised_pld_accountant
from fedsim.errors import ConfigError

# dp_accounting's RDP logs a warning for every order whose series does not converge
# (the order is then excluded, which keeps the bound valid); keep the console clean.
logging.getLogger("absl").setLevel(logging.ERROR)

UnsupportedEventError = dpa.UnsupportedEventError


def check_sampling_rate(q: float, name: str = "q") -> None:
    if not (isinstance(q, (int, float)) and 0.0 < q <= 1.0 and math.isfinite(q)):
        raise ConfigError(f"{name} must be in (0, 1], got {q!r}")


def check_noise_multiplier(sigma: float, name: str = "sigma") -> None:
    if not (isinstance(sigma, (int, float)) and sigma > 0.0 and math.isfinite(sigma)):
        raise ConfigError(f"{name} must be a positive finite number, got {sigma!r}")


def check_delta(delta: float, name: str = "delta") -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ConfigError(f"{name} must be in (0, 1), got {delta!r}")


def check_epsilon(epsilon: float, name: str = "epsilon") -> None:
    if not (isinstance(epsilon, (int, float)) and epsilon > 0.0 and math.isfinite(epsilon)):
        raise ConfigError(f"{name} must be a positive finite number, got {epsilon!r}")


def check_steps(steps: int, name: str = "steps") -> None:
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"{name} must be an integer >= 1, got {steps!r}")


def poisson_gaussian_event(q: float, noise_multiplier: float, steps: int) -> dp_event.DpEvent:
    """T rounds of a Poisson-subsampled Gaussian: the ULS (DP-FedAvg) release.

    One round releases sum_u clip(Delta_u) + N(0, (sigma C)^2 I) over a Poisson(q)
    cohort; with add/remove-one-user neighbours its sensitivity is C, so the
    noise multiplier is sigma = std / C.
    """
    check_sampling_rate(q)
    check_noise_multiplier(noise_multiplier, "noise_multiplier")
    check_steps(steps)
    one = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SelfComposedDpEvent(one, steps)


def is_non_private(event: dp_event.DpEvent) -> bool:
    """True if any part of the event releases data without noise (epsilon is then inf)."""
    if isinstance(event, dp_event.NonPrivateDpEvent):
        return True
    for f in getattr(type(event), "__attrs_attrs__", ()):
        v = getattr(event, f.name)
        items = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(x, dp_event.DpEvent) and is_non_private(x) for x in items):
            return True
    return False


class Accountant(abc.ABC):
    """Epsilon / delta of a DpEvent. Stateless: every call composes from scratch."""

    name: str = ""
    #: True when the value returned is a proven upper bound on the true epsilon.
    is_upper_bound: bool = True

    @abc.abstractmethod
    def supports(self, event: dp_event.DpEvent) -> bool:
        """Whether this backend can account for `event`."""

    @abc.abstractmethod
    def epsilon(self, event: dp_event.DpEvent, delta: float) -> float:
        """Epsilon at `delta` for the event (inf for a non-private event)."""

    @abc.abstractmethod
    def delta(self, event: dp_event.DpEvent, epsilon: float) -> float:
        """Delta at `epsilon` for the event."""

    def _require(self, event: dp_event.DpEvent) -> None:
        if not self.supports(event):
            raise UnsupportedEventError(f"the {self.name} accountant cannot account for {event}")


class _DpAccountingBackend(Accountant):
    """Thin wrapper over a dp_accounting PrivacyAccountant factory."""

    def _make(self) -> dpa.PrivacyAccountant:
        raise NotImplementedError

    def supports(self, event: dp_event.DpEvent) -> bool:
        return self._make().supports(event)

    def epsilon(self, event: dp_event.DpEvent, delta: float) -> float:
        check_delta(delta)
        if is_non_private(event):  # a state, not a crash
            return math.inf
        self._require(event)
        acc = self._make()
        acc.compose(event)
        return float(acc.get_epsilon(delta))

    def delta(self, event: dp_event.DpEvent, epsilon: float) -> float:
        if is_non_private(event):
            return 1.0
        self._require(event)
        acc = self._make()
        acc.compose(event)
        return float(acc.get_delta(epsilon))


@functools.lru_cache(maxsize=8)  # the budget guard needs one or two; calibration searches would fill more
def _subsampled_gaussian_pld(noise_multiplier: float, q: float, interval: float, relation):
    """dp_accounting's PLD of one Poisson-subsampled Gaussian release, built exactly as its
    `PLDAccountant` builds it. Building it is most of an epsilon query (~0.12 s at q=0.05,
    interval 1e-3, while composing it 200 times costs ~0.02 s) and the budget guard asks every
    round with the same release, so it is built once per setting. PLDs are immutable
    (`compose`/`self_compose` return new objects), so sharing one is safe."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    return pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=interval,
        sampling_prob=q, neighboring_relation=relation)


class PldAccountant(_DpAccountingBackend):
    """dp_accounting PLD (add/remove neighbours), pessimistic discretisation.

    The discretisation interval trades time for tightness, never validity: with the
    pessimistic estimate every interval gives an upper bound. At q=0.05, T=50 the
    epsilon at 1e-3 and 1e-4 agree to 5 digits while 1e-3 is ~10x faster.
    """

    name = "pld"

    def __init__(self, value_discretization_interval: float = 1e-3):
        self.value_discretization_interval = value_discretization_interval

    def _make(self) -> dpa.PrivacyAccountant:
        # dp_accounting's PLDAccountant with the subsampled-Gaussian PLD memoised (same numbers,
        # bit for bit, tested); it overrides a private method, so it lives in fedsim/compat.py
        return memoised_pld_accountant(self.value_discretization_interval, _subsampled_gaussian_pld)


class RdpAccountant(_DpAccountingBackend):
    """dp_accounting RDP with its default orders; conversion to (eps, delta) by
    Canonne, Kamath, Steinke 2020 (arXiv 2004.00010), Proposition 12."""

    name = "rdp"

    def _make(self) -> dpa.PrivacyAccountant:
        return rdp_privacy_accountant.RdpAccountant()


_REGISTRY: dict[str, Callable[..., Accountant]] = {
    "pld": PldAccountant,
    "rdp": RdpAccountant,
}


def register_accountant(name: str, factory: Callable[..., Accountant]) -> None:
    """Add a backend to `make_accountant` (used by prv, edgeworth, lmo modules)."""
    _REGISTRY[name] = factory


def accountant_names() -> list[str]:
    _load_optional_backends()
    return list(_REGISTRY)


#: accountants for every release (`accountant_names`, the per-accountant epsilons of a summary)
_OPTIONAL_BACKENDS = ("fedsim.privacy.prv", "fedsim.privacy.edgeworth", "fedsim.privacy.lmo")
#: found by name only (`make_accountant`): ELS's mixture accountant, named by ELS summaries
_ON_DEMAND_BACKENDS = ("fedsim.privacy.els_accounting",)


def _load_optional_backends(modules: tuple[str, ...] = _OPTIONAL_BACKENDS) -> None:
    # Imported lazily: they register themselves. Missing modules are simply absent.
    import importlib

    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # only tolerate the module itself missing
            if exc.name != mod:
                raise


def make_accountant(name: str, **options) -> Accountant:
    if name not in _REGISTRY:  # a fresh process (`fedsim account RUN_DIR`) has not imported them yet
        _load_optional_backends(_OPTIONAL_BACKENDS + _ON_DEMAND_BACKENDS)
    if name not in _REGISTRY:
        raise ConfigError(f"dp.accountant must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name](**options)


def compute_epsilon(event: dp_event.DpEvent, delta: float, accountant: str = "pld", **options) -> float:
    """The epsilon of `event` at `delta` under the named accountant."""
    return make_accountant(accountant, **options).epsilon(event, delta)
