"""Trainable weights as one flat buffer.

Every trainable parameter is re-pointed to a view of a single contiguous vector, so
"reset to the global weights", "delta = local - global" and "clip" are one vector op
each instead of a Python loop over tensors (on a small model that loop costs as much as
the training step). Gradients too: the parameters' `.grad` are views of `flat_grad`.
"""

from __future__ import annotations

import torch


class FlatParams:
    def __init__(self, model: torch.nn.Module):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        dev, dtype = self.params[0].device, self.params[0].dtype
        self.numel = sum(p.numel() for p in self.params)
        self.flat = torch.empty(self.numel, device=dev, dtype=dtype)
        self.flat_grad = torch.zeros(self.numel, device=dev, dtype=dtype)
        self.slices, off = [], 0
        for p in self.params:
            self.slices.append(slice(off, off + p.numel()))
            off += p.numel()
        self.grad_views = [self.flat_grad[s].view_as(p) for s, p in zip(self.slices, self.params)]
        with torch.no_grad():
            for s, p, g in zip(self.slices, self.params, self.grad_views):
                self.flat[s].copy_(p.reshape(-1))
                p.data, p.grad = self.flat[s].view_as(p), g

    def get(self) -> torch.Tensor:
        return self.flat.detach().clone()

    def set(self, vec: torch.Tensor) -> None:
        if vec.numel() != self.numel:
            raise ValueError(f"expected {self.numel} trainable values, got {vec.numel()}")
        with torch.no_grad():
            self.flat.copy_(vec.reshape(-1).to(self.flat.device, self.flat.dtype))

    def zero_grad(self) -> None:
        self.flat_grad.zero_()
        for p, g in zip(self.params, self.grad_views):  # re-attach if an optimizer set grad=None
            if p.grad is None or p.grad.data_ptr() != g.data_ptr():
                p.grad = g

    def state_dict(self, vec: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named tensors (for safetensors) from the flat vector (default: current weights)."""
        vec = self.flat if vec is None else vec
        return {name: vec[s].detach().reshape(p.shape).contiguous().cpu().clone()
                for name, s, p in zip(self.names, self.slices, self.params)}
