"""Per-example clipped gradient sums for the ELS (DP-SGD) step.

`clipper.clip_and_accumulate(batch, C)` writes sum_i clip_C(grad l_i) into `task.flat.flat_grad`
and returns the per-example norms before clipping; l_i is example i's own mean next-token loss,
so grad l_i is what a batch of one would give. Noise, the division by the expected batch size and
the optimizer step belong to the caller. `tests/test_els.py` checks every method against a naive
loop of batch-size-1 backward passes (the Opacus way).

* ``hooks`` (default; "book-keeping", Bu et al. 2023, arXiv 2210.00038): forward hooks keep each
  trainable layer's input a and output; ONE backward w.r.t. the layer outputs (skipping every
  weight-gradient product) gives their gradients g. Per-example norms come per layer from the
  ghost-norm identity ||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t.a_s)(g_t.g_s) (Li et al. 2022,
  arXiv 2110.05679, Sec. 4) or the materialised per-example gradient, whichever is cheaper; the
  clipped sum is then ONE weighted product per layer, sum_i c_i g_i^T a_i: no second backward, no
  B x d buffer for large layers. Supports nn.Linear, HF Conv1D, nn.Embedding (tied too) and
  nn.LayerNorm: GPT-2 full fine-tuning and peft LoRA.
* ``vmap``: torch.func `vmap(grad(loss))` over examples, in chunks, for models without
  data-dependent control flow. The attention mask is dropped inside vmap (HF mask building calls
  `.item()`): exact for right-padded causal LM batches, refused otherwise.
* ``opacus``: `GradSampleModule` materialises p.grad_sample (B x d). HF's broadcast [1, T] position
  ids mis-size its embedding sampler, so it gets [B, T] ones. Kept for the benchmark. Opacus ghost
  clipping refuses GPT-2's tied embeddings and fails on peft LoRA in opacus 1.6.0, so not offered.

ELS step / non-private step (`bench/els_overhead.py`, 1 thread): tiny model, batch 64: LoRA hooks
0.99x, vmap 0.87x, opacus 0.99x (within noise); full hooks 1.30x, vmap 2.3x, opacus 2.9x.
GPT-2-small (85M weights), batch 8: LoRA hooks 1.03x, vmap 1.24x, opacus 1.07x; full hooks 1.18x.
So "auto" picks ``hooks`` when every trainable parameter lives in a supported layer, else ``vmap``.
"""

from __future__ import annotations

import abc
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.models.causal_lm import autocast_context


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


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's target tokens ([B]), or over each of
    `groups` equal runs of consecutive rows ([groups])."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    ce = nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=-100, reduction="none")
    g = lb.shape[0] if groups is None else groups
    return ce.view(lb.shape).view(g, -1).sum(1) / (lb != -100).view(g, -1).sum(1).clamp(min=1)


def _norms(rows: torch.Tensor) -> torch.Tensor:
    """Row L2 norms accumulated in float64. torch 2.13's float32 `linalg.vector_norm` on CPU
    is 0.75% low on 85M entries (GPT-2-small full fine-tuning): clipping with it would let
    a clipped gradient exceed C."""
    return rows.reshape(rows.shape[0], -1).pow(2).sum(1, dtype=torch.float64).sqrt()


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """min(1, C / (||g|| + 1e-6)), the Opacus factor (as `per_user_clip` for ULS)."""
    from fedsim.privacy import sabotage

    if sabotage.active("no-clip"):  # the audit's self-test only (fedsim/privacy/sabotage.py)
        return torch.ones_like(norms)
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


class PerExampleClipper(abc.ABC):
    name = ""

    def __init__(self, task):
        self.task, self.flat = task, task.flat

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
        # every contribution within the ball of radius C) and redo the sum over the others; the
        # redo is checked too (dropout draws new masks), a few times at most, and a sum that
        # never comes out finite is released as zero (noise only). Counted in `dropped`.
        for _ in range(3):
            if keep.numel() == 0 or (keep.numel() == n and bool(torch.isfinite(self.flat.flat_grad).all())):
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

    def _losses(self, batch, explicit_positions: bool = False, groups: int | None = None) -> torch.Tensor:
        kw = {}
        if explicit_positions:
            # [B, T] position ids: HF builds [1, T] and broadcasts after the position
            # embedding, which would sum that layer's per-example gradients over the batch
            n, t = batch["input_ids"].shape
            kw["position_ids"] = torch.arange(t, device=batch["input_ids"].device).expand(n, t)
        with autocast_context(self.task.device, self.task.cfg.model.dtype):
            logits = self.task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
        return per_example_losses(logits, batch["labels"], groups)

    def _add_clipped(self, G: torch.Tensor, clip_norm: float) -> torch.Tensor:
        """flat_grad += sum of the clipped rows of G [B, d]; returns their norms."""
        nrm = _norms(G)
        with torch.no_grad():
            self.flat.flat_grad.add_(clip_factors(nrm, clip_norm).to(G.dtype) @ G)
        return nrm


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


class HookClipper(PerExampleClipper):
    """Ghost-norm / book-keeping per-example clipping with one backward pass (module docstring)."""

    name = "hooks"

    def __init__(self, task, max_materialised_bytes: int = 256 * 2**20):
        super().__init__(task)
        self.max_materialised_bytes = int(max_materialised_bytes)
        self._conv1d = _conv1d_type()
        supported = (nn.Linear, nn.Embedding, nn.LayerNorm) + self._conv1d
        owners: Counter[int] = Counter()
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
            owners.update(id(p) for p in own)
            self.modules.append(m)
        missing = {id(p) for p in self.flat.params} - set(owners)
        if missing:
            raise UnsupportedModelError(f"{len(missing)} trainable tensors are not owned by a supported layer")
        # a parameter held by two layers (GPT-2's tied wte / lm_head) is materialised per example
        self.shared = {pid for pid, n in owners.items() if n > 1}
        self.grad_view = dict(zip(map(id, self.flat.params), self.flat.grad_views))
        self._calls: list[tuple] | None = None
        # pass [B, T] position ids when the model has a trainable position embedding
        self.positions = any(isinstance(m, nn.Embedding) for m in self.modules)
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def _hook(self, module, inputs, output):
        if self._calls is not None and torch.is_grad_enabled():
            self._calls.append((module, inputs[0].detach(), output))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _record(self, batch, groups: int | None = None):
        """One forward with the hooks on and one backward w.r.t. the layer outputs only (no
        weight-gradient products): (losses, [(layer, input, output)] per call, output grads)."""
        self._calls = []
        try:
            losses = self._losses(batch, self.positions, groups)
        finally:
            calls, self._calls = self._calls, None
        for m, _, out in calls:
            if out.shape[0] != batch["input_ids"].shape[0]:
                raise UnsupportedModelError(f"a {type(m).__name__} layer runs on a batch-broadcast input"
                                            " (its per-example gradients are summed over the batch)")
        return losses, calls, torch.autograd.grad(losses.sum(), [out for _, _, out in calls], allow_unused=True)

    # per layer kind: squared norms (ghost) or per-example grads (materialised), and the
    # weighted sum sum_i c_i grad_i; a = layer input, g = gradient of the layer output
    def _params(self, m):
        return [(kind, p) for kind, p in (("weight", getattr(m, "weight", None)), ("bias", getattr(m, "bias", None)))
                if p is not None and p.requires_grad]

    def _per_example(self, m, kind, a, g):
        """[B, *p.shape] per-example gradient of m.<kind> for this call."""
        if isinstance(m, nn.Embedding):
            b, d = g.shape[0], g.shape[-1]
            ids, g = a.reshape(b, -1), g.reshape(b, -1, d)
            if m.padding_idx is not None:
                g = g.masked_fill((ids == m.padding_idx).unsqueeze(-1), 0.0)
            out = torch.zeros(b, m.num_embeddings, d, dtype=g.dtype, device=g.device)
            return out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, d), g)
        a3, g3 = _as_3d(a).to(g.dtype), _as_3d(g)
        if kind == "bias":
            return g3.sum(1)
        if isinstance(m, nn.LayerNorm):
            return (g3 * nn.functional.layer_norm(a3, m.normalized_shape, eps=m.eps)).sum(1)
        if isinstance(m, nn.Linear):
            return torch.bmm(g3.transpose(1, 2), a3)  # [B, out, in]
        return torch.bmm(a3.transpose(1, 2), g3)  # Conv1D weight is [in, out]

    @staticmethod
    def _ghost_is_cheaper(m, a, g) -> bool:
        if isinstance(m, nn.Embedding):
            return False  # the scatter is as cheap as a weight gradient; ghost is for memory
        t = _as_3d(g).shape[1]
        return t * (a.shape[-1] + g.shape[-1]) <= a.shape[-1] * g.shape[-1]

    @staticmethod
    def _ghost_sq_norm(m, a, g):
        """||g_i^T a_i||_F^2 per example without forming it: sum_{t,s} (a a^T)_{ts} (g g^T)_{ts}, the
        T x T products in the input dtype, their sum in float64. An embedding's a a^T is [id_t = id_s]."""
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            g = g.masked_fill((a == m.padding_idx).unsqueeze(-1), 0.0)
        g3 = _as_3d(g)
        if isinstance(m, nn.Embedding):
            ids = a.reshape(a.shape[0], -1)
            same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g3.dtype)
            return (same * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2), dtype=torch.float64)
        a3 = _as_3d(a).to(g.dtype)
        if a3.shape[1] == 1:
            return a3.pow(2).sum((1, 2), dtype=torch.float64) * g3.pow(2).sum((1, 2), dtype=torch.float64)
        return (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2), dtype=torch.float64)

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
        losses, calls, grads = self._record(batch)
        n = losses.shape[0]
        sq = torch.zeros(n, dtype=torch.float64, device=losses.device)
        materialised, ghost = {}, []  # {id(p): per-example grads}, [(layer, a, g, p)]
        used = Counter(id(m) for m, _, _ in calls)
        room = self.max_materialised_bytes
        # norms: ghost where cheaper (T^2 (in + out) vs T in out flops per example, e.g. wide
        # layers on short sequences) or where the per-example gradients would not fit in
        # memory; materialised otherwise (LoRA's rank-r factors, biases, norms, tied weights)
        for (m, a, _), g in zip(calls, grads):
            if g is None:
                continue
            for kind, p in self._params(m):
                size = n * p.numel() * p.element_size()
                may_ghost = (kind == "weight" and id(p) not in self.shared and used[id(m)] == 1
                             and isinstance(m, (nn.Linear, nn.Embedding) + self._conv1d))
                if may_ghost and (size > room or self._ghost_is_cheaper(m, a, g)):
                    sq += self._ghost_sq_norm(m, a, g)
                    ghost.append((m, a, g, p))
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
            for m, a, g, p in ghost:
                self._weighted_into(self.grad_view[id(p)], m, a, g, c)
            for pid, pe in materialised.items():
                self.grad_view[pid].add_(torch.tensordot(c.to(pe.dtype), pe, dims=1))
        return ClipResult(norms.detach(), losses.detach())


# -- vmap: torch.func ----------------------------------------------------------------------
class VmapClipper(PerExampleClipper):
    """vmap(grad(loss_i)) in chunks of `chunk` examples, then clip and sum."""

    name, chunk = "vmap", 32

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
            norms.append(self._add_clipped(torch.cat([g[n].reshape(ids.shape[0], -1) for n in self.flat.names], 1),
                                           clip_norm))
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
            losses = self._losses(batch, explicit_positions=True)  # the wrapped model: hooks are on it
            losses.sum().backward()
        finally:
            self.gsm.disable_hooks()
        G = torch.cat([p.grad_sample.reshape(n, -1) for p in self.flat.params], 1)
        for p in self.flat.params:
            p.grad_sample = None
        self.flat.zero_grad()
        return ClipResult(self._add_clipped(G, clip_norm).detach(), losses.detach())


class NaiveClipper(PerExampleClipper):
    """The slow, obvious reference: one backward per example (tests and benchmarks)."""

    name = "naive"

    def _clip_and_accumulate(self, batch, clip_norm: float) -> ClipResult:
        total = torch.zeros_like(self.flat.flat_grad)
        norms, losses = [], []
        for i in range(batch["input_ids"].shape[0]):
            self.flat.zero_grad()
            loss = self._losses({k: v[i : i + 1] for k, v in batch.items()})[0]
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
        raise ValueError(f"per-example method must be one of {('auto', *_CLASSES)}, got {method!r}")
    return _CLASSES[method](task)


def nonprivate_step_grad(task, batch) -> float:
    """The non-private reference step's gradient: mean loss, one backward (flat_grad <- grad)."""
    task.flat.zero_grad()
    loss = task.loss(batch)
    loss.backward()
    return float(loss)
