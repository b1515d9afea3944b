"""Pure privacy math: secret randomness, mechanisms, accountants, calibration, ledger. No models,
no Flower."""

from fedsim.privacy.accounting import (  # noqa: F401
    Accountant,
    compute_epsilon,
    make_accountant,
    poisson_gaussian_event,
)
from fedsim.privacy.calibration import calibrate_gaussian_noise_multiplier, calibrate_noise  # noqa: F401
from fedsim.privacy.ledger import PrivacyLedger  # noqa: F401
from fedsim.privacy.mechanisms import GaussianMechanism, NoiseMechanism, per_user_clip  # noqa: F401
from fedsim.privacy.randomness import SecretRandomness  # noqa: F401
