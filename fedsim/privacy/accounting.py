"""Where a run's epsilon is computed: dp_accounting `PrivacyAccountant`s, found by name.

Every release is a `dp_accounting.dp_event.DpEvent` (the ledger stores them); an accountant
composes events and answers `get_epsilon(delta)` / `get_delta(epsilon)`. `make_accountant(name)`:

* ``pld`` -- dp_accounting's `PLDAccountant` (add/remove neighbours, pessimistic
  discretisation: an upper bound up to the connect-the-dots construction of Doroshenko et
  al., arXiv 2207.04380), each distinct release's PLD built once (`_leaf_pld`). The default,
  the tightest, and it accounts for the ELS step (`MixtureOfGaussiansDpEvent`) too.
* ``rdp`` -- dp_accounting's `RdpAccountant` (Mironov 2017; subsampled Gaussian by Mironov,
  Talwar, Zhang 2019; conversion by Canonne, Kamath, Steinke 2020, Prop. 12). Looser.
* ``prv`` (`privacy/prv.py`), ``edgeworth`` (`privacy/edgeworth.py`), ``lmo_faithful``
  (`privacy/lmo/faithful.py`): fedsim's own, subclasses of `ReleaseCounter` below.

Only upper bounds are named here; the Edgeworth approximation (``is_upper_bound = False``)
cannot report a run's epsilon.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math

from dp_accounting import dp_event
from dp_accounting import privacy_accountant as dpa

from fedsim.compat import memoised_pld_accountant

# dp_accounting's RDP logs a warning for every order whose series does not converge
# (the order is then excluded, which keeps the bound valid); keep the console clean.
logging.getLogger("absl").setLevel(logging.ERROR)

UnsupportedEventError = dpa.UnsupportedEventError
ADD_OR_REMOVE = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


def check_sampling_rate(q: float, name: str = "q") -> None:
    if not (isinstance(q, (int, float)) and 0.0 < q <= 1.0 and math.isfinite(q)):
        raise ValueError(f"{name} must be in (0, 1], got {q!r}")


def check_positive(x: float, name: str) -> None:
    if not (isinstance(x, (int, float)) and x > 0.0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")


def check_delta(delta: float, name: str = "delta") -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")


def check_steps(steps: int, name: str = "steps") -> None:
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")


def poisson_gaussian_event(q: float, noise_multiplier: float, steps: int) -> dp_event.DpEvent:
    """T ULS rounds: sum_u clip(Delta_u) + N(0, (sigma C)^2 I) over a Poisson(q) cohort; with
    add/remove-one-user neighbours the sensitivity is C, so sigma = std / C."""
    check_sampling_rate(q)
    check_positive(noise_multiplier, "noise_multiplier")
    check_steps(steps)
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(noise_multiplier)),
                                        steps)


# -- fedsim's own accountants ---------------------------------------------------------------------


NO_LOSS = object()  # a release whose output does not depend on the user
NON_PRIVATE = object()  # a release without noise


class ReleaseCounter(dpa.PrivacyAccountant):
    """A dp_accounting `PrivacyAccountant` that composes by counting releases.

    The walk over `ComposedDpEvent` / `SelfComposedDpEvent` / `NoOpDpEvent` /
    `NonPrivateDpEvent` is done here once; a subclass names the releases it understands
    (`release_key`: a hashable key, `NO_LOSS`, `NON_PRIVATE`, or None for unsupported) and
    computes epsilon and delta from `self.counts` {key: times composed} (`_epsilon`,
    `_delta`). Composing costs O(1); the work is in the query, and it depends on the number
    of distinct releases, never on how many rounds were composed."""

    name = ""
    is_upper_bound = True

    def __init__(self):
        super().__init__(ADD_OR_REMOVE)
        self.counts: dict = {}
        self.non_private = False

    def release_key(self, event: dp_event.DpEvent):
        raise NotImplementedError

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, dp_event.NoOpDpEvent) or (do_compose and count == 0):
            return None
        if isinstance(event, dp_event.SelfComposedDpEvent):
            return self._maybe_compose(event.event, count * int(event.count), do_compose)
        if isinstance(event, dp_event.ComposedDpEvent):
            for sub in event.events:
                error = self._maybe_compose(sub, count, do_compose)
                if error is not None:
                    return error
            return None
        key = NON_PRIVATE if isinstance(event, dp_event.NonPrivateDpEvent) else self.release_key(event)
        if key is None:
            return self.CompositionErrorDetails(invalid_event=event,
                                                error_message=f"the {self.name} accountant cannot account for it")
        if do_compose and key is NON_PRIVATE:
            self.non_private = True
        elif do_compose and key is not NO_LOSS:
            self.counts[key] = self.counts.get(key, 0) + count
        return None

    def get_epsilon(self, target_delta: float) -> float:
        check_delta(target_delta)
        if self.non_private:
            return math.inf
        return self._epsilon(target_delta) if self.counts else 0.0

    def get_delta(self, target_epsilon: float) -> float:
        if self.non_private:
            return 1.0
        return self._delta(target_epsilon) if self.counts else 0.0

    def _epsilon(self, delta: float) -> float:
        raise NotImplementedError

    def _delta(self, epsilon: float) -> float:
        raise NotImplementedError


# -- dp_accounting's accountants --------------------------------------------------------------------


@functools.lru_cache(maxsize=16)  # the budget guard needs one or two; calibration searches fill more
def _cached_pld(sigma: float, sens: tuple | None, probs, interval: float):
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    if sens is None:  # a Poisson(probs)-subsampled Gaussian, as PLDAccountant builds it
        return pld_lib.from_gaussian_mechanism(standard_deviation=sigma, value_discretization_interval=interval,
                                               sampling_prob=probs, neighboring_relation=ADD_OR_REMOVE)
    return pld_lib.from_mixture_gaussian_mechanism(standard_deviation=sigma, sensitivities=list(sens),
                                                   sampling_probs=list(probs), value_discretization_interval=interval)


def _leaf_pld(event, interval: float):
    """The PLD dp_accounting's PLDAccountant builds for one subsampled-Gaussian or mixture
    release, built once per setting: building is most of a query (0.12 s for a q=0.05 Gaussian
    at interval 1e-3, ~1 s for the ELS mixture at 1e-2) while self-composing it costs tens of
    ms, and the budget guard asks with the same release every round. PLDs are immutable, so
    sharing one is safe. None: not memoised (the library builds it, or refuses it)."""
    if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent):
        q, sigma = float(event.sampling_probability), float(event.event.noise_multiplier)
        return None if q == 0 or sigma == 0 else _cached_pld(sigma, None, q, float(interval))
    if isinstance(event, dp_event.MixtureOfGaussiansDpEvent) and event.standard_deviation != 0:
        sens = tuple(float(c) for c in event.sensitivities)
        return None if sens in ((0.0,), ()) else _cached_pld(
            float(event.standard_deviation), sens, tuple(float(p) for p in event.sampling_probs), float(interval))
    return None


def pld_accountant(value_discretization_interval: float = 1e-3) -> dpa.PrivacyAccountant:
    """dp_accounting's PLDAccountant (add/remove); the interval trades time for tightness, never
    validity (at q=0.05, T=50, 1e-3 and 1e-4 agree to 5 digits while 1e-3 is ~10x faster)."""
    if not 0 < value_discretization_interval <= 0.1:
        raise ValueError(f"value_discretization_interval must be in (0, 0.1], got {value_discretization_interval!r}")
    return memoised_pld_accountant(value_discretization_interval, _leaf_pld)


def rdp_accountant() -> dpa.PrivacyAccountant:
    from dp_accounting.rdp import rdp_privacy_accountant

    return rdp_privacy_accountant.RdpAccountant()


#: name -> (module, factory). Imported on first use, never as a side effect.
_ACCOUNTANTS = {
    "pld": ("fedsim.privacy.accounting", "pld_accountant"),
    "rdp": ("fedsim.privacy.accounting", "rdp_accountant"),
    "prv": ("fedsim.privacy.prv", "PrvAccountant"),
    "edgeworth": ("fedsim.privacy.edgeworth", "EdgeworthAccountant"),
    "lmo_faithful": ("fedsim.privacy.lmo.faithful", "LmoFaithfulAccountant"),
}
#: names older run directories use: the ELS mixture PLD (now `pld` at the ELS interval)
_ALIASES = {"els_pld": ("pld", {"value_discretization_interval": 1e-2})}


def accountant_names() -> list[str]:
    return list(_ACCOUNTANTS)


def accountant_factory(name: str):
    """The class or function that makes the named accountant (its keyword arguments are the options)."""
    name = _ALIASES.get(name, (name,))[0]
    if name not in _ACCOUNTANTS:
        raise ValueError(f"the accountant must be one of {sorted(_ACCOUNTANTS)}, got {name!r}")
    module, factory = _ACCOUNTANTS[name]
    return getattr(importlib.import_module(module), factory)


def options_for(name: str, options: dict) -> dict:
    """The subset of `options` the named accountant's factory takes (e.g. a PLD discretisation
    interval is kept for pld and edgeworth, dropped for rdp)."""
    import inspect

    params = inspect.signature(accountant_factory(name)).parameters
    return {k: v for k, v in options.items() if k in params}


def make_accountant(name: str, **options) -> dpa.PrivacyAccountant:
    """A fresh accountant by name (options: the factory's keyword arguments)."""
    if name in _ALIASES:
        options = {**_ALIASES[name][1], **options}
    return accountant_factory(name)(**options)


def epsilon(accountant: str | dpa.PrivacyAccountant, event: dp_event.DpEvent, delta: float, **options) -> float:
    """Epsilon of `event` at `delta` under a fresh accountant (a name) or composed onto `accountant`."""
    check_delta(delta)
    acc = make_accountant(accountant, **options) if isinstance(accountant, str) else accountant
    eps = float(acc.compose(event).get_epsilon(delta))
    return eps if not math.isnan(eps) else math.inf


def compute_epsilon(event: dp_event.DpEvent, delta: float, accountant: str = "pld", **options) -> float:
    """The epsilon of `event` at `delta` under the named accountant."""
    return epsilon(accountant, event, delta, **options)
