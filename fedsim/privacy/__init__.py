"""Pure privacy math: secret randomness, mechanisms, accountants, calibration, ledger, budget,
the release. No config, no models, no Flower; from the rest of fedsim it imports only the leaf
modules `fedsim.errors` and `fedsim.compat`.

The names below load on first use (PEP 562): a cohort worker imports `fedsim.privacy.clipping`
alone, without the accountants' dp_accounting and scipy."""

import importlib

_EXPORTS = {
    "compute_epsilon": "accounting", "make_accountant": "accounting", "poisson_gaussian_event": "accounting",
    "calibrate_gaussian_noise_multiplier": "calibration", "calibrate_noise": "calibration",
    "PrivacyLedger": "ledger", "GaussianMechanism": "mechanisms", "NoiseMechanism": "mechanisms",
    "per_user_clip": "clipping", "SecretRandomness": "randomness",
}
__all__ = ["GaussianMechanism", "NoiseMechanism", "PrivacyLedger", "SecretRandomness",
           "calibrate_gaussian_noise_multiplier", "calibrate_noise", "compute_epsilon", "make_accountant",
           "per_user_clip", "poisson_gaussian_event"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fedsim.privacy.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fedsim.privacy' has no attribute {name!r}")
