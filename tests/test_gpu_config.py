"""configs/gpu.yaml and the device-independent parts of the GPU path, checked on a CPU:
the config validates, a machine without CUDA gets a one-line error (exit 2), Ray actors
ask for the fractional GPU, bf16 autocast is chosen only on CUDA, and the model is
GPT-2 small's size."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsim.config import load_config
from fedsim.errors import FedsimError, ModelError

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "configs" / "gpu.yaml"


def test_gpu_config_loads_and_asks_for_gpus_bf16_and_cohort_workers():
    cfg = load_config(GPU)
    assert cfg.run.device == "cuda" and cfg.model.dtype == "bfloat16"
    assert 0 < cfg.simulation.num_gpus < 1 and cfg.simulation.backend == "ray"
    assert cfg.uls.users_per_client > 1 and cfg.simulation.num_cpus >= 1
    a = cfg.model.arch
    assert (a.n_layer, a.n_embd, a.n_head, a.vocab_size) == (12, 768, 12, 50257) and cfg.model.lora.enabled
    assert cfg.data.seq_len == 128


def test_ray_client_resources_carry_the_gpu_fraction():
    from fedsim.simulate import ray_backend_config

    cfg = load_config(GPU)
    bc = ray_backend_config(cfg)
    assert bc["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert "address" not in bc["init_args"]
    bc = ray_backend_config(load_config(GPU, ["simulation.ray_address=10.0.0.1:6379"]))
    assert bc["init_args"]["address"] == "10.0.0.1:6379"


def test_flower_packs_four_actors_per_gpu(monkeypatch):
    """Flower's actor count (used by fedsim on a cluster) on a fake 2-GPU, 16-CPU node and a CPU-only node."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    from fedsim.simulate import ray_backend_config

    res = ray_backend_config(load_config(GPU))["client_resources"]
    monkeypatch.setattr(ray, "nodes", lambda: [{"Resources": {"CPU": 16.0, "GPU": 2.0}}, {"Resources": {"CPU": 64.0}}])
    assert pool_size_from_resources(res) == 8  # min(16 / 2 CPUs, 2 / 0.25 GPUs); the CPU-only node hosts none


def test_autocast_is_bf16_on_cuda_only():
    from fedsim.models.causal_lm import autocast_context

    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        ctx = autocast_context(torch.device("cuda"), "bfloat16")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cuda"
    assert isinstance(autocast_context(torch.device("cuda"), "float32"), contextlib.nullcontext)
    assert isinstance(autocast_context(torch.device("cpu"), "bfloat16"), contextlib.nullcontext)


def test_devices_are_checked_before_anything_starts(monkeypatch):
    from fedsim.simulate import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="run.device is 'cuda'"):
        check_devices(load_config(GPU))
    with pytest.raises(FedsimError, match="simulation.num_gpus=0.25"):
        check_devices(load_config(GPU, ["run.device=cpu"]))
    check_devices(load_config(GPU, ["run.device=cpu", "simulation.ray_address=10.0.0.1:6379"]))  # GPUs may be remote
    check_devices(load_config(GPU, ["run.device=cpu", "simulation.num_gpus=0"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_fedsim_run_gpu_config_without_cuda_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(GPU), "--set", f"run.output_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    out = p.stdout + p.stderr
    assert "Traceback" not in out
    assert "error: run.device is 'cuda' but no CUDA device is available" in out
    assert not any(tmp_path.iterdir())  # nothing was written


def test_gpt2_small_shape_has_124m_parameters():
    from fedsim.models.causal_lm import _gpt2_from_arch

    cfg = load_config(GPU)
    with torch.device("meta"):  # shapes only, no memory
        m = _gpt2_from_arch(cfg.model.arch, cfg.data.seq_len, cfg.model.arch.vocab_size, 0)
    n = sum(p.numel() for p in m.parameters())
    assert n == 124_439_808 - (1024 - 128) * 768  # GPT-2 small less the unused position rows


def test_a_local_ray_is_sized_to_the_cohort_workers_asked_for():
    """Flower starts one actor per simulation.num_cpus CPUs of Ray: with num_workers set, the
    others would sit idle holding torch (bench/ray_memory.py: 1,905 -> 1,743 MB, one worker)."""
    from fedsim.config import load_config
    from fedsim.simulate import local_ray_resources

    base = ["simulation.backend=ray", "uls.users_per_client=100"]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [*base, "simulation.num_workers=1"])
    assert local_ray_resources(cfg) == {"num_cpus": 1}
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [*base, "simulation.num_workers=3", "simulation.num_cpus=0.5"])
    assert local_ray_resources(cfg) == {"num_cpus": 2}
    assert local_ray_resources(load_config(ROOT / "configs" / "smoke.yaml", base)) == {}  # workers follow the machine
    assert local_ray_resources(load_config(ROOT / "configs" / "smoke.yaml", [
        *base, "simulation.num_workers=1", "simulation.ray_address=127.0.0.1:6379"])) == {}  # a cluster: its own size
