"""LMO-DP noise (Yang et al., arXiv 2405.18776) and two accountings of it, never confused.

Each coordinate of the clipped sum gets ``C * Laplace(0, 1/t_i)`` with a fresh random rate
``t = a1 * Gamma(G_k, scale G_theta) + a3 * Exponential(rate E_lambda) + a4 * Uniform(U_a, U_b)``
(`params`: its law and the closed-form density; `sampler`; `mechanism`: `LmoMechanism`).

* :func:`paper_epsilon` (`paper`) reproduces the paper's public code, *labelled as such*: **not**
  an upper bound on what fedsim releases, never used for budgets.
* :class:`LmoFaithfulAccountant` (`faithful`, ``"lmo_faithful"``) is the upper bound for what
  fedsim releases; runs' ledgers and budget guards use it.

`search` finds parameters meeting a target under either accounting (`fedsim lmo-search`).
"""

from fedsim.privacy.lmo.faithful import (  # noqa: F401
    SPARSE_ORDERS, LmoDpEvent, LmoFaithfulAccountant, LmoMixtureDpEvent, divergence_table, faithful_els_epsilon,
    faithful_epsilon, faithful_unsampled_rdp, lmo_els_step_event, lmo_event)
from fedsim.privacy.lmo.mechanism import LmoMechanism  # noqa: F401
from fedsim.privacy.lmo.paper import (  # noqa: F401
    PAPER_ORDERS, PAPER_VARIANTS, lmo_rdp, lmo_valid_order_limit, paper_epsilon, paper_rdp_curve)
from fedsim.privacy.lmo.params import PARAM_NAMES, LmoParams  # noqa: F401
from fedsim.privacy.lmo.sampler import sample_lmo_noise, sample_t  # noqa: F401
from fedsim.privacy.subsampled_rdp import (  # noqa: F401
    ORDERS, generic_rdp_gaussian_els_epsilon, generic_rdp_gaussian_epsilon, mixture_subsampled_rdp, subsampled_rdp)
