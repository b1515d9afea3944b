"""The paper's synthetic task: private mean estimation with users (Charles et al. 2024,
arXiv 2407.07737, the mean-estimation study), ULS and ELS in plain vectorised torch.

Data. N users, each with m examples in R^d:
    x_{u,j} = mu + sqrt(h) a_u + sqrt(1 - h) b_{u,j},   a_u, b_{u,j} ~ N(0, I / d)
so every example has E||x - mu||^2 = 1 and the heterogeneity knob h in [0, 1] is the share
of that variance that is *between* users: h = 0, a user's examples are as diverse as the
whole population; h = 1, a user's examples are all the same point. ||mu|| = 1.

Loss. f(w; x) = ||w - x||^2 / 2, gradient w - x. The population loss is closed form,
F(w) = ||w - mu||^2 / 2 + 1/2, and we report the excess loss ||w - mu||^2 / 2.

ULS (DP-FedAvg). Per round each user joins with probability q; a sampled user runs E
epochs of full-batch GD with step eta_c on its first m_u <= m examples, so its delta is
closed form, (1 - (1 - eta_c)^E) (xbar_u - w); deltas are clipped to C, summed, noised by
the mechanism, divided by q N, and the server steps with lr eta_s. Compute: m_u E per
sampled user.
ELS (DP-SGD). Each user keeps k examples; each step samples every kept example with
probability p; per-example gradients w - x are clipped to C, summed, noised, divided by
p N k; w <- w - eta g. Compute: the sampled examples.

Both run replicas [seed, mechanism group, learning rate] at once; a group is one
`NoiseMechanism` (a clip norm and a calibrated noise), so one call covers every (epsilon, C)
pair of a sweep cell with common random numbers. The privacy pieces (`add_noise`, calibration,
the ELS accountant) are fedsim's own (`bench/mean_estimation_sweep.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedsim.privacy.mechanisms import NoiseMechanism


@dataclass(frozen=True)
class MeanEstimationProblem:
    num_users: int
    examples_per_user: int
    dim: int
    heterogeneity: float
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.heterogeneity <= 1.0:
            raise ValueError(f"heterogeneity must be in [0, 1], got {self.heterogeneity!r}")
        if min(self.num_users, self.examples_per_user, self.dim) < 1:
            raise ValueError("num_users, examples_per_user and dim must be >= 1")

    def generate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [d], examples [N, m, d]) from the problem's seed."""
        g = torch.Generator().manual_seed(self.seed)
        n, m, d, h = self.num_users, self.examples_per_user, self.dim, self.heterogeneity
        mu = torch.randn(d, generator=g)
        mu /= mu.norm()
        a = torch.randn(n, 1, d, generator=g) / d**0.5
        b = torch.randn(n, m, d, generator=g) / d**0.5
        return mu, mu + h**0.5 * a + (1 - h) ** 0.5 * b

    @staticmethod
    def excess_loss(w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """F(w) - min F = ||w - mu||^2 / 2 (per row of w)."""
        return 0.5 * (w - mu).pow(2).sum(-1)


def _clip_rows(v: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Clip the last-dim rows of v to norms clip (broadcast over v's leading dims)."""
    return v * (clip / (v.norm(dim=-1, keepdim=True) + 1e-6)).clamp(max=1.0)


def _poisson_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Indices of each row's sampled items, padded: (index [S, W], valid [S, W] float, W)."""
    counts = mask.sum(1)
    width = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # sampled first
    valid = (torch.arange(width).view(1, -1) < counts.view(-1, 1)).float()
    return order, valid, width


def _dp_replicas(update, *, iterations: int, pool: int, rate: float, mechanisms: list[NoiseMechanism],
                 lrs: torch.Tensor, seeds: int, d: int, seed: int, purpose: str, cost: tuple = ()):
    """The loop both methods share (w [S, G, L, d]): per seed a Poisson(rate) sample of the `pool`
    items, padded to the largest (padding masked out; an empty one releases noise only); each sampled
    item's `update(w, index, width)` [S, G, L, W, d] clipped to its group's C, summed and noised;
    w += lrs * sum / (rate * pool). Returns (w, compute: sampled items times `cost`)."""
    groups, lr = len(mechanisms), lrs.reshape(1, 1, -1, 1)
    clip = torch.tensor([m.clip_norm for m in mechanisms]).view(1, -1, 1, 1, 1)  # against [S, G, L, W, d]
    w = torch.zeros(seeds, groups, lr.shape[2], d)
    gen = torch.Generator().manual_seed(seed)  # samples (a simulation: public is fine here)
    # the noise keystream: reproducible (synthetic users, no real data to protect), drawn by the
    # same code as a real run's noise
    from fedsim.privacy.randomness import SecretRandomness

    noise = SecretRandomness.from_seed(seed).stream(purpose, 0)
    compute = 0.0
    for _ in range(iterations):
        idx, valid, width = _poisson_rows(torch.rand(seeds, pool, generator=gen) < rate)
        compute += math.prod((float(valid.sum(1).mean()), *cost))
        total = torch.zeros(seeds, groups, lr.shape[2], d)
        if width:
            total = torch.einsum("sw,sglwd->sgld", valid, _clip_rows(update(w, idx, width), clip))
        for g, mech in enumerate(mechanisms):  # each group's noise on its own sums
            part = total[:, g].contiguous()
            mech.add_noise(part, noise)
            total[:, g] = part
        w = w + lr * total / (rate * pool)
    return w, compute


def run_uls(examples: torch.Tensor, mu: torch.Tensor, *, rounds: int, q: float, mechanisms: list[NoiseMechanism],
            server_lrs: torch.Tensor, seeds: int, examples_per_user: int | None = None, local_lr: float = 1.0,
            local_epochs: int = 1, noise_seed: int = 0) -> dict:
    """ULS for replicas [seed, mechanism group, server lr]; returns excess losses [S, G, L] and compute.
    A sampled user trains on its first `examples_per_user` examples (all by default); every group
    sees the same cohorts."""
    n, m, d = examples.shape
    used = m if examples_per_user is None else examples_per_user
    if not 1 <= used <= m:
        raise ValueError(f"examples_per_user must be in 1..{m}, got {used}")
    xbar = examples[:, :used].mean(1)  # [N, d]
    shrink = 1.0 - (1.0 - local_lr) ** local_epochs
    w, compute = _dp_replicas(  # a cohort's closed-form local training
        lambda w, idx, width: shrink * (xbar[idx].view(seeds, 1, 1, width, d) - w.unsqueeze(3)),
        iterations=rounds, pool=n, rate=q, mechanisms=mechanisms, lrs=server_lrs, seeds=seeds, d=d,
        seed=noise_seed, purpose="mean-estimation-uls-noise", cost=(used, local_epochs))
    return {"excess_loss": MeanEstimationProblem.excess_loss(w, mu), "compute": compute}


def run_els(examples: torch.Tensor, mu: torch.Tensor, *, steps: int, k: int, p: float,
            mechanisms: list[NoiseMechanism], lrs: torch.Tensor, seeds: int, noise_seed: int = 0) -> dict:
    """ELS for replicas [seed, mechanism group, lr]: users keep their first k examples (i.i.d.,
    so a random choice), Poisson(p) example sampling, per-example clipping, noise, / (p N k)."""
    _, m, d = examples.shape
    if not 1 <= k <= m:
        raise ValueError(f"k must be in 1..{m}, got {k}")
    kept = examples[:, :k].reshape(-1, d)  # [M, d]
    w, compute = _dp_replicas(  # per-example gradients w - x; the step is w -= lr g (a negated lr)
        lambda w, idx, width: w.unsqueeze(3) - kept[idx].view(seeds, 1, 1, width, d),
        iterations=steps, pool=kept.shape[0], rate=p, mechanisms=mechanisms, lrs=-lrs, seeds=seeds, d=d,
        seed=noise_seed + 1, purpose="mean-estimation-els-noise")
    return {"excess_loss": MeanEstimationProblem.excess_loss(w, mu), "compute": compute}
