"""Per-example clipped gradient sums for the ELS (DP-SGD) step.

One verb: `clipper.clip_and_accumulate(batch, C)` writes sum_i clip_C(grad l_i) into the
task's flat gradient buffer (`task.flat.flat_grad`) and returns the per-example norms
before clipping. l_i is example i's own loss (mean next-token cross-entropy over its
target tokens), so grad l_i is the gradient a batch of one would give. Noise, the
division by the expected batch size and the optimizer step belong to the caller.

Three implementations, one contract (`tests/test_els.py` checks each against a naive
loop of batch-size-1 backward passes, the Opacus way):

* ``hooks`` (default; "book-keeping", Bu et al. 2023, arXiv 2210.00038): forward hooks
  keep each trainable layer's input a and output; ONE backward pass
  (`torch.autograd.grad` w.r.t. the layer outputs, which skips every weight-gradient
  product) gives the output gradients g. Per-example norms come per layer from either
  the ghost-norm identity ||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t.a_s)(g_t.g_s)
  (Li et al. 2022, arXiv 2110.05679, Sec. 4) or the materialised per-example gradient,
  whichever is cheaper for that layer's shape; then the clipped sum is ONE weighted
  weight-gradient product per layer, sum_i c_i g_i^T a_i. No second backward, no
  B x d buffer for large layers. Supports nn.Linear, HF GPT-2 Conv1D, nn.Embedding (tied
  input/output embeddings too), nn.LayerNorm: GPT-2 full fine-tuning and LoRA (peft's
  lora_A / lora_B are nn.Linear).
* ``vmap``: torch.func `vmap(grad(loss))` over examples, in chunks. Works for any model
  whose forward has no data-dependent control flow; the attention mask is dropped
  inside vmap (HF mask building calls `.item()`), which is exact for right-padded
  causal LM batches (padding comes after every target token and the padded labels are
  ignored) and refused otherwise.
* ``opacus``: Opacus `GradSampleModule` hooks materialise p.grad_sample (B x d), then clip
  and sum. Correct for LoRA and, given [B, T] position ids (its embedding sampler
  mis-sizes HF's broadcast [1, T] ones), for full fine-tuning; HF's Conv1D goes through
  its functorch fallback. Kept for the benchmark. Opacus ghost clipping
  (GradSampleModuleFastGradientClipping) refuses GPT-2's tied embeddings and fails on
  peft LoRA layers in opacus 1.6.0 (`_forward_counter`), so it is not offered.

ELS step / non-private step, measured by `bench/els_overhead.py` (median of interleaved
pairs, 1 thread): default tiny model, batch 64: LoRA hooks 0.99x, vmap 0.87x, opacus
0.99x (all within the run-to-run spread); full hooks 1.30x, vmap 2.3x, opacus 2.9x.
GPT-2-small shape (85M weights), batch 8: LoRA hooks 1.03x, vmap 1.24x, opacus 1.07x;
full hooks 1.18x. So `make_clipper(task, "auto")` picks ``hooks`` when every trainable
parameter lives in a supported layer, else ``vmap``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.models.causal_lm import autocast_context

METHODS = ("auto", "hooks", "vmap", "opacus")


class UnsupportedModelError(ValueError):
    """The model has a trainable layer this per-example method cannot handle."""


@dataclass
class ClipResult:
    norms: torch.Tensor  # [B] per-example gradient L2 norms before clipping (non-finite: dropped)
    losses: torch.Tensor  # [B] per-example losses (detached)
    dropped: int = 0  # examples whose gradient was not finite: left out of the sum (a zero contribution)

    @property
    def size(self) -> int:
        return int(self.norms.numel())

    def clipped_fraction(self, clip_norm: float) -> float:
        """Share of the examples in the sum whose gradient norm exceeded C."""
        kept = self.norms[torch.isfinite(self.norms)]
        return float((kept > clip_norm).float().mean()) if kept.numel() else 0.0


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] mean next-token cross-entropy of each example over its own target tokens."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    ce = nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=-100, reduction="none")
    counts = (lb != -100).sum(1).clamp(min=1)
    return ce.view(lb.shape).sum(1) / counts


def _norms(rows: torch.Tensor) -> torch.Tensor:
    """Row L2 norms accumulated in float64. torch 2.13's float32 `linalg.vector_norm` on CPU
    is 0.75% low on 85M entries (GPT-2-small full fine-tuning): clipping with it would let
    a clipped gradient exceed C."""
    return rows.reshape(rows.shape[0], -1).pow(2).sum(1, dtype=torch.float64).sqrt()


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """min(1, C / (||g|| + 1e-6)), the Opacus factor (as `per_user_clip` for ULS)."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


class PerExampleClipper(abc.ABC):
    name = ""

    def __init__(self, task):
        self.task = task
        self.flat = task.flat

    def clip_and_accumulate(self, batch: dict[str, torch.Tensor], clip_norm: float) -> ClipResult:
        """flat_grad <- sum_i clip(grad l_i); an empty batch gives a zero sum."""
        n = int(batch["input_ids"].shape[0])
        if n == 0:
            self.flat.zero_grad()
            empty = torch.zeros(0, device=self.flat.flat.device)
            return ClipResult(empty, empty)
        res = self._clip_and_accumulate(batch, clip_norm)
        keep = torch.isfinite(res.norms).nonzero().squeeze(1)
        # A NaN/Inf gradient would make its clip factor, and with it the whole sum, NaN: a
        # data-dependent failure of the step. Drop those examples (a zero contribution keeps
        # every example's contribution within the ball of radius C) and redo the sum over the
        # others; the redo is checked too (dropout draws new masks), a few times at most, and a
        # sum that never comes out finite is released as zero (noise only). Counted in `dropped`.
        for _ in range(3):
            if keep.numel() == n and bool(torch.isfinite(self.flat.flat_grad).all()):
                break
            if keep.numel() == 0:
                break
            again = self._clip_and_accumulate({k: v[keep] for k, v in batch.items()}, clip_norm)
            keep = keep[torch.isfinite(again.norms)]
            n = int(again.norms.numel())
        if keep.numel() == 0 or not bool(torch.isfinite(self.flat.flat_grad).all()) or keep.numel() != n:
            self.flat.zero_grad()
            keep = keep[:0]
        res.dropped = int(batch["input_ids"].shape[0]) - int(keep.numel())
        return res

    @abc.abstractmethod
    def _clip_and_accumulate(self, batch, clip_norm: float) -> ClipResult: ...

    def close(self) -> None:
        """Remove hooks (the model is left as it was)."""

    def _forward_losses(self, batch, explicit_positions: bool = False) -> torch.Tensor:
        kw = {}
        if explicit_positions:
            # [B, T] position ids: HF builds [1, T] and broadcasts after the position
            # embedding, which would sum that layer's per-example gradients over the batch
            n, t = batch["input_ids"].shape
            kw["position_ids"] = torch.arange(t, device=batch["input_ids"].device).expand(n, t)
        with autocast_context(self.task.device, self.task.cfg.model.dtype):
            logits = self.task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
        return per_example_losses(logits, batch["labels"])


# -- hooks: book-keeping with ghost norms -------------------------------------------------
def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: no Conv1D layers can exist either
        return ()
    return (Conv1D,)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """[B, ..., F] -> [B, T, F] (T = 1 for [B, F])."""
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])


def _ghost_sq_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||g_i^T a_i||_F^2 per example without forming it: sum_{t,s} (a a^T)_{ts} (g g^T)_{ts}
    (the T x T products in the input dtype, their sum accumulated in float64)."""
    if a.shape[1] == 1:
        return a.pow(2).sum((1, 2), dtype=torch.float64) * g.pow(2).sum((1, 2), dtype=torch.float64)
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2), dtype=torch.float64)


def _ghost_sq_norm_embedding(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Embedding: ||sum_t e_{id_t} g_t^T||^2 = sum_{t,s} [id_t = id_s] (g_t . g_s)."""
    ids = ids.reshape(ids.shape[0], -1)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    return (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2), dtype=torch.float64)


class _Layer:
    """One call of a trainable layer in the current forward: its input and output."""

    __slots__ = ("module", "inp", "out")

    def __init__(self, module, inp, out):
        self.module, self.inp, self.out = module, inp, out


class HookClipper(PerExampleClipper):
    """Ghost-norm / book-keeping per-example clipping with one backward pass (module docstring)."""

    name = "hooks"

    def __init__(self, task, max_materialised_bytes: int = 256 * 2**20):
        super().__init__(task)
        self.max_materialised_bytes = int(max_materialised_bytes)
        self._conv1d = _conv1d_type()
        supported = (nn.Linear, nn.Embedding, nn.LayerNorm) + self._conv1d
        trainable = {id(p) for p in self.flat.params}
        owners: dict[int, int] = {}
        self.modules: list[nn.Module] = []
        for name, m in task.model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(m, supported):
                raise UnsupportedModelError(f"layer {name} ({type(m).__name__}) has trainable weights; hooks support "
                                            "Linear, Conv1D, Embedding, LayerNorm")
            if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
                raise UnsupportedModelError(f"embedding {name}: max_norm / scale_grad_by_freq / sparse are not supported")
            if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
                raise UnsupportedModelError(f"layer norm {name}: only a 1-d normalized_shape is supported")
            for p in own:
                owners[id(p)] = owners.get(id(p), 0) + 1
            self.modules.append(m)
        missing = trainable - set(owners)
        if missing:
            raise UnsupportedModelError(f"{len(missing)} trainable tensors are not owned by a supported layer")
        # a parameter held by two layers (GPT-2's tied wte / lm_head) is materialised per example
        self.shared = {pid for pid, n in owners.items() if n > 1}
        self.grad_view = dict(zip((id(p) for p in self.flat.params), self._views()))
        self._calls: list[_Layer] | None = None
        # pass [B, T] position ids when the model has a trainable position embedding
        self.positions = any(isinstance(m, nn.Embedding) for m in self.modules)
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def _views(self):
        off = 0
        for p in self.flat.params:
            yield self.flat.flat_grad[off : off + p.numel()].view_as(p)
            off += p.numel()

    def _hook(self, module, inputs, output):
        if self._calls is not None and torch.is_grad_enabled():
            self._calls.append(_Layer(module, inputs[0].detach(), output))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # per layer kind: squared norms (ghost) or per-example grads (materialised), and the
    # weighted sum sum_i c_i grad_i; a = layer input, g = gradient of the layer output
    def _params(self, m):
        return [(kind, p) for kind, p in (("weight", getattr(m, "weight", None)), ("bias", getattr(m, "bias", None)))
                if p is not None and p.requires_grad]

    def _per_example(self, m, kind, a, g):
        """[B, *p.shape] per-example gradient of m.<kind> for this call."""
        if isinstance(m, nn.Embedding):
            ids = a
            b, d = g.shape[0], g.shape[-1]
            ids, g = ids.reshape(b, -1), g.reshape(b, -1, d)
            if m.padding_idx is not None:
                g = g.masked_fill((ids == m.padding_idx).unsqueeze(-1), 0.0)
            out = torch.zeros(b, m.num_embeddings, d, dtype=g.dtype, device=g.device)
            return out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, d), g)
        a3, g3 = _as_3d(a).to(g.dtype), _as_3d(g)
        if isinstance(m, nn.LayerNorm):
            if kind == "bias":
                return g3.sum(1)
            xhat = nn.functional.layer_norm(a3, m.normalized_shape, eps=m.eps)
            return (g3 * xhat).sum(1)
        if kind == "bias":
            return g3.sum(1)
        if isinstance(m, nn.Linear):
            return torch.bmm(g3.transpose(1, 2), a3)  # [B, out, in]
        return torch.bmm(a3.transpose(1, 2), g3)  # Conv1D weight is [in, out]

    @staticmethod
    def _ghost_is_cheaper(m, a, g) -> bool:
        if isinstance(m, nn.Embedding):
            return False  # the scatter is as cheap as a weight gradient; ghost is for memory
        t = _as_3d(g).shape[1]
        return t * (a.shape[-1] + g.shape[-1]) <= a.shape[-1] * g.shape[-1]

    def _ghost_sq_norm(self, m, a, g):
        if isinstance(m, nn.Embedding):
            if m.padding_idx is not None:
                g = g.masked_fill((a == m.padding_idx).unsqueeze(-1), 0.0)
            return _ghost_sq_norm_embedding(a, _as_3d(g))
        return _ghost_sq_norm(_as_3d(a).to(g.dtype), _as_3d(g))

    @staticmethod
    def _weighted_into(out: torch.Tensor, m, a, g, c) -> None:
        """out <- sum_i c_i grad_i of a ghost-normed weight (used once per forward): one
        product, with c scaling the narrower of the layer's input and output."""
        cw = c.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
        if isinstance(m, nn.Embedding):
            ids = a.reshape(-1)
            rows = (g * cw).reshape(-1, g.shape[-1])
            if m.padding_idx is not None:
                rows = rows.masked_fill((ids == m.padding_idx).unsqueeze(-1), 0.0)
            out.index_add_(0, ids, rows.to(out.dtype))
            return
        a = a.to(g.dtype)
        if a.shape[-1] <= g.shape[-1]:
            a = a * cw
        else:
            g = g * cw
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        if isinstance(m, nn.Linear):
            torch.mm(g2.t(), a2, out=out)  # [out, in]
        else:
            torch.mm(a2.t(), g2, out=out)  # Conv1D: [in, out]

    def _clip_and_accumulate(self, batch, clip_norm: float) -> ClipResult:
        # forward: hooks record every trainable layer's input and output
        self._calls = []
        try:
            losses = self._forward_losses(batch, explicit_positions=self.positions)
        finally:
            calls, self._calls = self._calls, None
        n = losses.shape[0]
        for call in calls:
            if call.out.shape[0] != n:
                raise UnsupportedModelError(f"a {type(call.module).__name__} layer runs on a batch-broadcast input"
                                            " (its per-example gradients are summed over the batch)")
        # backward: output gradients only (no weight-gradient products)
        grads = torch.autograd.grad(losses.sum(), [c.out for c in calls], allow_unused=True)
        sq = torch.zeros(n, dtype=torch.float64, device=losses.device)
        materialised: dict[int, torch.Tensor] = {}
        ghost: list[tuple] = []
        used: dict[int, int] = {}
        for call in calls:
            used[id(call.module)] = used.get(id(call.module), 0) + 1
        room = self.max_materialised_bytes
        # norms: ghost where cheaper (T^2 (in + out) vs T in out flops per example, e.g. wide
        # layers on short sequences) or where the per-example gradients would not fit in
        # memory; materialised otherwise (LoRA's rank-r factors, biases, norms, tied weights)
        for call, g in zip(calls, grads):
            if g is None:
                continue
            m, a = call.module, call.inp
            for kind, p in self._params(m):
                size = n * p.numel() * p.element_size()
                may_ghost = (kind == "weight" and id(p) not in self.shared and used[id(m)] == 1
                             and isinstance(m, (nn.Linear, nn.Embedding) + self._conv1d))
                if may_ghost and (size > room or self._ghost_is_cheaper(m, a, g)):
                    sq += self._ghost_sq_norm(m, a, g)
                    ghost.append((m, kind, a, g, p))
                    continue
                room -= size
                pe = self._per_example(m, kind, a, g)
                materialised[id(p)] = materialised[id(p)] + pe if id(p) in materialised else pe
        for pe in materialised.values():
            sq += pe.reshape(n, -1).pow(2).sum(1, dtype=torch.float64)
        norms = sq.sqrt()
        c = clip_factors(norms, clip_norm)
        # clipped sum: one weighted product per ghost weight, c @ G for materialised ones
        self.flat.zero_grad()
        with torch.no_grad():
            for m, kind, a, g, p in ghost:
                self._weighted_into(self.grad_view[id(p)], m, a, g, c)
            for pid, pe in materialised.items():
                self.grad_view[pid].add_(torch.tensordot(c.to(pe.dtype), pe, dims=1))
        return ClipResult(norms.detach(), losses.detach())


# -- vmap: torch.func ----------------------------------------------------------------------
class VmapClipper(PerExampleClipper):
    """vmap(grad(loss_i)) in chunks of `chunk` examples, then clip and sum."""

    name = "vmap"

    def __init__(self, task, chunk: int = 32):
        super().__init__(task)
        self.chunk = chunk

    def _loss_one(self, params, ids, labels):
        from torch.func import functional_call

        with autocast_context(self.task.device, self.task.cfg.model.dtype):
            out = functional_call(self.task.model, params, args=(), kwargs={"input_ids": ids[None]}, strict=False)
        return per_example_losses(out.logits, labels[None])[0]

    def _clip_and_accumulate(self, batch, clip_norm: float) -> ClipResult:
        from torch.func import grad_and_value, vmap

        mask = batch["attention_mask"]
        if mask.shape[1] > 1 and not bool((mask[:, 1:] <= mask[:, :-1]).all()):
            raise UnsupportedModelError("the vmap path needs right-padded batches (it drops the attention mask)")
        params = {n: p.detach() for n, p in zip(self.flat.names, self.flat.params)}
        per_ex = vmap(grad_and_value(self._loss_one), in_dims=(None, 0, 0))
        self.flat.zero_grad()
        norms, losses = [], []
        for i in range(0, batch["input_ids"].shape[0], self.chunk):
            ids, labels = batch["input_ids"][i : i + self.chunk], batch["labels"][i : i + self.chunk]
            g, loss = per_ex(params, ids, labels)
            G = torch.cat([g[n].reshape(ids.shape[0], -1) for n in self.flat.names], 1)
            nrm = _norms(G)
            with torch.no_grad():
                self.flat.flat_grad.add_(clip_factors(nrm, clip_norm).to(G.dtype) @ G)
            norms.append(nrm)
            losses.append(loss)
        return ClipResult(torch.cat(norms).detach(), torch.cat(losses).detach())


# -- opacus: GradSampleModule --------------------------------------------------------------
class OpacusClipper(PerExampleClipper):
    """Opacus GradSampleModule hooks (p.grad_sample, B x d materialised), then clip and sum."""

    name = "opacus"

    def __init__(self, task):
        super().__init__(task)
        from opacus.grad_sample import GradSampleModule

        self.gsm = GradSampleModule(task.model, loss_reduction="sum", strict=False)
        self.gsm.disable_hooks()  # only on inside this clipper's own steps

    def close(self) -> None:
        from fedsim.compat import close_grad_sample_module

        close_grad_sample_module(self.gsm)

    def _clip_and_accumulate(self, batch, clip_norm: float) -> ClipResult:
        n = batch["input_ids"].shape[0]
        self.gsm.enable_hooks()
        try:
            losses = self._forward_losses(batch, explicit_positions=True)  # the wrapped model: hooks are on it
            losses.sum().backward()
        finally:
            self.gsm.disable_hooks()
        G = torch.cat([p.grad_sample.reshape(n, -1) for p in self.flat.params], 1)
        for p in self.flat.params:
            p.grad_sample = None
        nrm = _norms(G)
        self.flat.zero_grad()
        with torch.no_grad():
            self.flat.flat_grad.add_(clip_factors(nrm, clip_norm).to(G.dtype) @ G)
        return ClipResult(nrm.detach(), losses.detach())


class NaiveClipper(PerExampleClipper):
    """The slow, obvious reference: one backward per example (tests and benchmarks)."""

    name = "naive"

    def _clip_and_accumulate(self, batch, clip_norm: float) -> ClipResult:
        total = torch.zeros_like(self.flat.flat_grad)
        norms, losses = [], []
        for i in range(batch["input_ids"].shape[0]):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            self.flat.zero_grad()
            loss = self._forward_losses(one)[0]
            loss.backward()
            g = self.flat.flat_grad
            nrm = _norms(g.unsqueeze(0))[0]
            total.add_(g * clip_factors(nrm, clip_norm).to(g.dtype))
            norms.append(nrm.detach())
            losses.append(loss.detach())
        self.flat.flat_grad.copy_(total)
        return ClipResult(torch.stack(norms), torch.stack(losses))


_CLASSES = {"hooks": HookClipper, "vmap": VmapClipper, "opacus": OpacusClipper, "naive": NaiveClipper}


def make_clipper(task, method: str = "auto") -> PerExampleClipper:
    """The per-example clipper for `task`; "auto" = hooks when supported, else vmap."""
    if method == "auto":
        try:
            return HookClipper(task)
        except UnsupportedModelError:
            return VmapClipper(task)
    if method not in _CLASSES:
        raise ValueError(f"per-example method must be one of {METHODS + ('naive',)}, got {method!r}")
    return _CLASSES[method](task)


def nonprivate_step_grad(task, batch) -> float:
    """The non-private reference step's gradient: mean loss, one backward (flat_grad <- grad)."""
    task.flat.zero_grad()
    loss = task.loss(batch)
    loss.backward()
    return float(loss)


__all__ = [
    "METHODS", "ClipResult", "HookClipper", "NaiveClipper", "OpacusClipper", "PerExampleClipper",
    "UnsupportedModelError", "VmapClipper", "clip_factors", "make_clipper", "nonprivate_step_grad",
    "per_example_losses",
]
