"""Drawing LMO noise: float64 on the CPU, from the secret keystream (`privacy/randomness.py`)."""

from __future__ import annotations

import torch

from fedsim.privacy.lmo.params import LmoParams


def sample_t(params: LmoParams, stream, n: int) -> torch.Tensor:
    """n draws (float64, CPU) of the random Laplace rate t."""
    t = torch.zeros(int(n), dtype=torch.float64)
    if params.a1 > 0:
        t.add_(stream.gamma(params.G_k, n), alpha=params.a1 * params.G_theta)  # a1 * Gamma(G_k, scale G_theta)
    if params.a3 > 0:
        t.add_(stream.exponential(n), alpha=params.a3 / params.E_lambda)  # a3 * Exp(RATE E_lambda): mean a3/E_lambda
    if params.a4 > 0:
        t.add_(stream.uniform(n).mul_(params.U_b - params.U_a).add_(params.U_a), alpha=params.a4)
    return t


def sample_lmo_noise(params: LmoParams, stream, n: int, scale: float = 1.0) -> torch.Tensor:
    """n values (float64, CPU) of scale * Laplace(0, 1/t), t fresh per value (the LMO noise)."""
    t = sample_t(params, stream, n).clamp_(min=torch.finfo(torch.float64).tiny)
    lap = stream.exponential(n).mul_(stream.signs(n))  # Laplace(0, 1) = sign * Exp(1)
    return lap.div_(t).mul_(scale)  # Laplace(0, 1/t): scale 1/t, not t
