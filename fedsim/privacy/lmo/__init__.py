"""LMO-DP noise (Yang et al., arXiv 2405.18776) and two accountings of it, never confused.

The mechanism
-------------
Each coordinate of the (clipped) sum gets its own Laplace noise whose *rate* is random::

    t = a1 * Gamma(shape=G_k, scale=G_theta) + a3 * Exponential(rate=E_lambda) + a4 * Uniform(U_a, U_b)
    noise_i = C * Laplace(0, scale=1/t_i)          (fresh t_i for every coordinate i)

Noise is i.i.d. across coordinates, so the d-dimensional density is the product of the
one-coordinate mixture density (`params`: its closed form; `sampler`: drawing it;
`mechanism`: `LmoMechanism`).

Two accountings
---------------
* :func:`paper_epsilon` (`paper`) reproduces the paper's public code, *labelled as such*: the
  1-D RDP formula :func:`lmo_rdp` at integer orders 2..128, converted with Canonne-Kamath-Steinke
  (their `get_privacy_spent`), "amplified" after the conversion as ``log(1 + q (e^eps - 1))``
  and composed either linearly per step (their noise search) or in RDP before the
  conversion (their checking script). It is **not** an upper bound on what fedsim releases
  (it can err either way) and is never used for budgets.
* :class:`LmoFaithfulAccountant` (`faithful`, accountant name ``"lmo_faithful"``) is the upper
  bound for what fedsim releases: an L2-clipped d-dimensional sum plus i.i.d. LMO noise,
  Poisson-subsampled, composed, converted with CKS. Runs' ledgers and budget guards use it.

`search` finds parameters meeting a target under either accounting (`fedsim lmo-search`).
"""

from fedsim.privacy.lmo.faithful import (  # noqa: F401
    SPARSE_ORDERS, LmoDpEvent, LmoFaithfulAccountant, LmoMixtureDpEvent, divergence_table, faithful_els_epsilon,
    faithful_epsilon, faithful_unsampled_rdp, lmo_els_event, lmo_els_step_event, lmo_event, mixture_rdp)
from fedsim.privacy.lmo.mechanism import LmoMechanism  # noqa: F401
from fedsim.privacy.lmo.paper import (  # noqa: F401
    PAPER_ORDERS, PAPER_VARIANTS, lmo_rdp, lmo_valid_order_limit, paper_epsilon, paper_rdp_curve)
from fedsim.privacy.lmo.params import PARAM_NAMES, LmoParams  # noqa: F401
from fedsim.privacy.lmo.sampler import sample_lmo_noise, sample_t  # noqa: F401
from fedsim.privacy.subsampled_rdp import (  # noqa: F401
    ORDERS, generic_rdp_gaussian_els_epsilon, generic_rdp_gaussian_epsilon, mixture_subsampled_rdp, subsampled_rdp)
