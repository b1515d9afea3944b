"""Pure privacy math: secret randomness, mechanisms, accountants, calibration, ledger, budget,
the release. No config, no models, no Flower; from the rest of fedsim it imports only the leaf
modules `fedsim.errors` and `fedsim.compat`."""

from fedsim.privacy.accounting import compute_epsilon, make_accountant, poisson_gaussian_event  # noqa: F401
from fedsim.privacy.calibration import calibrate_gaussian_noise_multiplier, calibrate_noise  # noqa: F401
from fedsim.privacy.ledger import PrivacyLedger  # noqa: F401
from fedsim.privacy.mechanisms import GaussianMechanism, NoiseMechanism, per_user_clip  # noqa: F401
from fedsim.privacy.randomness import SecretRandomness  # noqa: F401
