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
`NoiseMechanism` (a clip norm and a calibrated noise), so one call covers every
(epsilon, C) pair of a sweep cell with common random numbers. The privacy pieces are
fedsim's own: the mechanisms' `add_noise`, calibration and the ELS accountant (see
`bench/mean_estimation_sweep.py`).
"""

from __future__ import annotations

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


def _noise_and_scale(total: torch.Tensor, mechanisms: list[NoiseMechanism], stream) -> torch.Tensor:
    """Each mechanism adds its noise to its own group's sums (dim 1 of [S, G, L, d])."""
    for g, mech in enumerate(mechanisms):
        part = total[:, g].contiguous()
        mech.add_noise(part, stream)
        total[:, g] = part
    return total


def _noise_stream(noise_seed: int, purpose: str):
    """The study's noise keystream: reproducible (synthetic users, no real data to protect),
    drawn by the same code as a real run's noise."""
    from fedsim.privacy.randomness import SecretRandomness

    return SecretRandomness.from_seed(noise_seed).stream(purpose, 0)


def _clips(mechanisms: list[NoiseMechanism]) -> torch.Tensor:
    return torch.tensor([m.clip_norm for m in mechanisms]).view(1, -1, 1, 1)


def _poisson_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Indices of each row's sampled items, padded: (index [S, W], valid [S, W] float, W)."""
    counts = mask.sum(1)
    width = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # sampled first
    valid = (torch.arange(width).view(1, -1) < counts.view(-1, 1)).float()
    return order, valid, width


def run_uls(examples: torch.Tensor, mu: torch.Tensor, *, rounds: int, q: float, mechanisms: list[NoiseMechanism],
            server_lrs: torch.Tensor, seeds: int, examples_per_user: int | None = None, local_lr: float = 1.0,
            local_epochs: int = 1, noise_seed: int = 0) -> dict:
    """ULS for replicas [seed, mechanism group, server lr]; returns excess losses [S, G, L] and compute.

    A sampled user trains on its first `examples_per_user` examples (all by default). A
    group is one mechanism (its clip norm and noise); every group sees the same cohorts."""
    n, m, d = examples.shape
    used = m if examples_per_user is None else examples_per_user
    if not 1 <= used <= m:
        raise ValueError(f"examples_per_user must be in 1..{m}, got {used}")
    groups, lr = len(mechanisms), server_lrs.reshape(1, 1, -1, 1)
    clip = _clips(mechanisms).unsqueeze(-1)  # [1, G, 1, 1, 1] against [S, G, L, W, d]
    w = torch.zeros(seeds, groups, lr.shape[2], d)
    xbar = examples[:, :used].mean(1)  # [N, d]
    shrink = 1.0 - (1.0 - local_lr) ** local_epochs
    gen = torch.Generator().manual_seed(noise_seed)  # cohorts (a simulation: public is fine here)
    noise = _noise_stream(noise_seed, "mean-estimation-uls-noise")
    compute = 0.0
    for _ in range(rounds):
        # Poisson cohort per seed (possibly empty)
        idx, valid, width = _poisson_rows(torch.rand(seeds, n, generator=gen) < q)
        compute += float(valid.sum(1).mean()) * used * local_epochs
        total = torch.zeros(seeds, groups, lr.shape[2], d)
        if width:
            # local training (closed form), clip each user's delta, sum over the cohort
            delta = shrink * (xbar[idx].view(seeds, 1, 1, width, d) - w.unsqueeze(3))  # [S, G, L, W, d]
            total = torch.einsum("sw,sglwd->sgld", valid, _clip_rows(delta, clip))
        # noise from each group's mechanism, divide by the expected cohort, server step
        w = w + lr * _noise_and_scale(total, mechanisms, noise) / (q * n)
    return {"excess_loss": MeanEstimationProblem.excess_loss(w, mu), "compute": compute}


def run_els(examples: torch.Tensor, mu: torch.Tensor, *, steps: int, k: int, p: float,
            mechanisms: list[NoiseMechanism], lrs: torch.Tensor, seeds: int, noise_seed: int = 0) -> dict:
    """ELS for replicas [seed, mechanism group, lr]: users keep their first k examples (i.i.d.,
    so a random choice), Poisson(p) example sampling, per-example clipping, noise, / (p N k)."""
    n, m, d = examples.shape
    if not 1 <= k <= m:
        raise ValueError(f"k must be in 1..{m}, got {k}")
    kept = examples[:, :k].reshape(-1, d)  # [M, d]
    big_m, groups, lr = kept.shape[0], len(mechanisms), lrs.reshape(1, 1, -1, 1)
    clip = _clips(mechanisms).unsqueeze(-1)  # [1, G, 1, 1, 1] against [S, G, L, W, d]
    w = torch.zeros(seeds, groups, lr.shape[2], d)
    gen = torch.Generator().manual_seed(noise_seed + 1)  # samples (a simulation: public is fine here)
    noise = _noise_stream(noise_seed + 1, "mean-estimation-els-noise")
    compute = 0.0
    for _ in range(steps):
        # Poisson sample per seed, padded to the largest batch (padding is masked out)
        idx, valid, width = _poisson_rows(torch.rand(seeds, big_m, generator=gen) < p)
        compute += float(valid.sum(1).mean())
        total = torch.zeros(seeds, groups, lr.shape[2], d)
        if width:  # an empty batch releases noise only
            g = w.unsqueeze(3) - kept[idx].view(seeds, 1, 1, width, d)  # [S, G, L, W, d]
            total = torch.einsum("sw,sglwd->sgld", valid, _clip_rows(g, clip))
        # noise, divide by the expected batch, step
        w = w - lr * _noise_and_scale(total, mechanisms, noise) / (p * big_m)
    return {"excess_loss": MeanEstimationProblem.excess_loss(w, mu), "compute": compute}
