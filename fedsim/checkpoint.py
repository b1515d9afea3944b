"""Atomic checkpoints: tensors in safetensors, everything else in JSON. Never pickle.

Layout in a run directory:
  checkpoint-r{round}.safetensors  trainable weights, optimizer tensors, public RNG states (`rng.*`, e.g.
                                   torch's global RNG for dropout in ELS)
  checkpoint.json                  round, optimizer hyper-parameters, tensor file name + sha256

The tensor file is written atomically under a new name, then the JSON pointer is replaced
atomically, then older tensor files are removed: a crash at any point leaves a pointer to a
complete tensor file; a missing one or a wrong hash is a corrupt checkpoint (FedsimError).
No secret randomness is ever written: cohorts, example samples and noise are functions of a
process's key and the round (`privacy/randomness.py`), never of a generator state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fedsim.errors import FedsimError
from fedsim.rundir import atomic_write_text, save_safetensors

POINTER = "checkpoint.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)][k] = {"tensor": f"opt.{pid}.{k}"}
            else:
                meta["state"][str(pid)][k] = {"value": v}
    return tensors, meta


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, *, step: int, weights: torch.Tensor, optimizer_state: dict,
                    extra: dict | None = None, rng_states: dict[str, torch.Tensor] | None = None) -> Path:
    """`rng_states`: public generator states to restore (e.g. torch's global RNG, which drives
    dropout), stored as tensors `rng.<name>`."""
    run_dir = Path(run_dir)
    opt_tensors, opt_meta = _split_optimizer_state(optimizer_state)
    tensors = {"weights": weights, **opt_tensors, **{f"rng.{key}": st for key, st in (rng_states or {}).items()}}
    name = f"checkpoint-r{step}.safetensors"
    save_safetensors(run_dir / name, tensors)
    pointer = {"step": step, "tensors": name, "sha256": _sha256(run_dir / name), "optimizer": opt_meta,
               **(extra or {})}
    atomic_write_text(run_dir / POINTER, json.dumps(pointer, indent=1))
    for old in run_dir.glob("checkpoint-r*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return run_dir / name


def load_checkpoint(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    ptr = run_dir / POINTER
    if not ptr.is_file():
        raise FedsimError(f"{run_dir} has no checkpoint ({POINTER} missing); set run.checkpoint_every and rerun")
    try:
        meta = json.loads(ptr.read_text(encoding="utf-8"))
        tfile = run_dir / meta["tensors"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FedsimError(f"{ptr}: corrupt checkpoint pointer ({exc})") from None
    if not tfile.is_file():
        raise FedsimError(f"{ptr}: its tensor file {tfile.name} is missing")
    if _sha256(tfile) != meta.get("sha256"):
        raise FedsimError(f"{tfile}: corrupt checkpoint (sha256 does not match {POINTER})")
    try:
        tensors = load_file(str(tfile))
    except Exception as exc:  # safetensors raises its own error types
        raise FedsimError(f"{tfile}: unreadable checkpoint ({exc})") from None
    try:
        meta["weights"] = tensors["weights"]
        meta["optimizer_state"] = _join_optimizer_state(tensors, meta.pop("optimizer"))
        int(meta["step"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FedsimError(f"{ptr}: corrupt checkpoint pointer (missing or malformed {exc})") from None
    meta["rng_states"] = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return meta


def checkpoint_method(run_dir) -> str:
    """"ELS" or "ULS": which trainer wrote the run directory's checkpoint (from metrics.jsonl when
    the pointer is unreadable, so the right resume reports what is wrong with it; ULS if neither says)."""
    try:
        return json.loads((Path(run_dir) / POINTER).read_text(encoding="utf-8")).get("method", "ULS")
    except (OSError, ValueError, AttributeError):
        pass
    try:  # no readable pointer: the metrics rows say which (ELS counts "step", ULS "round")
        with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as fh:
            return "ELS" if "step" in json.loads(fh.readline()) else "ULS"
    except (OSError, ValueError, TypeError):
        return "ULS"


def checkpoint_if_due(cfg, run_dir: Path, step: int, *, weights: torch.Tensor, optimizer_state: dict,
                      extra: dict | None = None, rng_states: dict[str, torch.Tensor] | None = None) -> bool:
    """Write a checkpoint when `run.checkpoint_every` divides `step`. Returns whether one was written."""
    if not (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
        return False
    save_checkpoint(run_dir, step=step, weights=weights, optimizer_state=optimizer_state, extra=extra,
                    rng_states=rng_states)
    return True
