"""Trainable weights as one flat buffer.

Every trainable parameter is re-pointed to a view of a single contiguous vector, so
"reset to the global weights", "delta = local - global" and "clip" are one vector op
each instead of a Python loop over tensors (on a small model that loop costs as much as
the training step). Gradients get the same treatment: `flat_grad` is one buffer whose
views are the parameters' `.grad`.
"""

from __future__ import annotations

import torch


class FlatParams:
    def __init__(self, model: torch.nn.Module):
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        dev, dtype = self.params[0].device, self.params[0].dtype
        self.numel = sum(p.numel() for p in self.params)
        self.flat = torch.empty(self.numel, device=dev, dtype=dtype)
        self.flat_grad = torch.zeros(self.numel, device=dev, dtype=dtype)
        off = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                self.flat[off : off + n].copy_(p.reshape(-1))
                p.data = self.flat[off : off + n].view_as(p)
                p.grad = self.flat_grad[off : off + n].view_as(p)
                off += n
        self.shapes = [tuple(p.shape) for p in self.params]

    def get(self) -> torch.Tensor:
        return self.flat.detach().clone()

    def set(self, vec: torch.Tensor) -> None:
        if vec.numel() != self.numel:
            raise ValueError(f"expected {self.numel} trainable values, got {vec.numel()}")
        with torch.no_grad():
            self.flat.copy_(vec.reshape(-1).to(self.flat.device, self.flat.dtype))

    def zero_grad(self) -> None:
        self.flat_grad.zero_()
        for p, off in zip(self.params, self._offsets()):  # re-attach if an optimizer set grad=None
            if p.grad is None or p.grad.data_ptr() != self.flat_grad[off].data_ptr():
                p.grad = self.flat_grad[off : off + p.numel()].view_as(p)

    def _offsets(self):
        off = 0
        for p in self.params:
            yield off
            off += p.numel()

    def state_dict(self, vec: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named tensors (for safetensors) from the flat vector (default: current weights)."""
        vec = self.flat if vec is None else vec
        out, off = {}, 0
        for name, shape, p in zip(self.names, self.shapes, self.params):
            n = p.numel()
            out[name] = vec[off : off + n].detach().reshape(shape).contiguous().cpu().clone()
            off += n
        return out
