"""Tasks: a model, how to batch a user's examples, its loss and evaluation."""

from __future__ import annotations


def build_task(cfg, store=None, device=None, log=print):
    from fedsim.models.causal_lm import CausalLMTask

    return CausalLMTask(cfg, store, device, log)
