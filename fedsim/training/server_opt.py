"""Server optimizers for DP-FedAvg: the noisy average delta is a pseudo-gradient
g = -avg_delta, and SGD / heavy-ball momentum / Adam step on the global weights
(Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2). Post-processing
of a DP release: no privacy cost.
"""

from __future__ import annotations

import torch


class ServerOptimizer:
    def __init__(self, weights: torch.Tensor, kind: str = "sgd", lr: float = 1.0, momentum: float = 0.9):
        self.param = torch.nn.Parameter(weights.detach().clone())
        if kind in ("sgd", "momentum"):
            self.opt = torch.optim.SGD([self.param], lr=lr, momentum=momentum if kind == "momentum" else 0)
        elif kind == "adam":
            self.opt = torch.optim.Adam([self.param], lr=lr, betas=(momentum, 0.99), eps=1e-3)
        else:
            raise ValueError(f"unknown server optimizer {kind!r}")

    @property
    def weights(self) -> torch.Tensor:
        return self.param.detach()

    def step(self, avg_delta: torch.Tensor) -> torch.Tensor:
        self.param.grad = (-avg_delta).to(self.param.dtype)
        self.opt.step()
        self.param.grad = None
        return self.weights

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
