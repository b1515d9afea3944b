"""Ray across GPUs, checked on a CPU machine: Ray started with logical GPUs places the cohort
workers (`simulation.num_gpus: 0.25`: four per GPU) and each worker takes its device from Ray's
assignment (`fedsim.workers.worker_device`), never a fixed `cuda:0`; on a two-node cluster the
same config spreads the workers over both nodes.

The workers here are Flower's own actors (`BasicActorPool` of `ClientAppActor`, created with
fedsim's `client_resources`, as Flower's Ray backend creates them), each running a probe in
place of a ClientApp. Every Ray here runs in a private RAY_TMPDIR, so nobody else's
`ray.init()` can find it (and it cannot find theirs), and is stopped by the test that started it.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from fedsim.config import load_config
from fedsim.errors import ModelError
from fedsim.workers import cuda_index, worker_device

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
GPU_SIM = ["simulation.backend=ray", "simulation.num_gpus=0.25", "uls.users_per_client=3"]


# -- the device rule, without Ray ------------------------------------------------------------------


def test_cuda_index_follows_rays_assignment():
    assert cuda_index(["1"], "1") == 0  # Ray narrowed CUDA_VISIBLE_DEVICES to the assigned GPU: it is cuda:0
    assert cuda_index(["3"], "0,3") == 1
    assert cuda_index([2], None) == 2  # Ray left the variable alone: the id is torch's index
    assert cuda_index(["2"], "") == 2
    with pytest.raises(ModelError, match="does not list it"):
        cuda_index(["5"], "0,1")


def test_worker_device_is_rays_gpu_not_run_device(monkeypatch, caplog):
    cfg = load_config(SMOKE, ["run.device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_device(cfg, ["1"]) == torch.device("cuda", 1)  # not "cuda", i.e. the current device 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert worker_device(cfg, ["1"]) == torch.device("cuda", 0)
    assert worker_device(load_config(SMOKE, ["run.device=cpu"]), ["1"]) == torch.device("cpu")  # asked for the CPU
    # no Ray GPU: run.device as the server resolves it
    assert worker_device(load_config(SMOKE, ["run.device=auto"]), []) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device(load_config(SMOKE, ["run.device=auto"]), []) == torch.device("cpu")
    # a GPU from Ray but no CUDA (a logical GPU): the CPU, and a warning naming the GPU
    with caplog.at_level("WARNING", logger="fedsim"):
        assert worker_device(cfg, ["1"]) == torch.device("cpu")
    assert "Ray assigned GPU 1" in caplog.text and "no CUDA" in caplog.text
    with pytest.raises(ModelError, match="run.device is 'cuda'"):  # no Ray GPU and no CUDA: refused as before
        worker_device(cfg, [])


def test_no_ray_gpus_outside_a_ray_worker():
    from fedsim.workers import ray_gpu_ids

    assert ray_gpu_ids() == []  # the driver (or the in-process grid) is never placed by Ray


# -- Ray with logical GPUs -------------------------------------------------------------------------


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A private, short RAY_TMPDIR (Ray's socket paths must fit 107 bytes), removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="fsgpu", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _pythonpath() -> dict:
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}


def _probe(cfg):
    """A client_app_fn for Flower's ClientAppActor.run: instead of training, report where Ray put
    this actor and the device fedsim's worker takes there (and would take with CUDA present)."""

    def client_app_fn():
        def app(message, context):
            import ray
            import torch

            from fedsim.workers import ray_gpu_ids, worker_device

            out = {"gpu_ids": ray_gpu_ids(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                   "node": ray.get_runtime_context().get_node_id(), "device": str(worker_device(cfg))}
            real = torch.cuda.is_available
            torch.cuda.is_available = lambda: True  # as on a GPU machine: which GPU would it train on?
            try:
                out["device_with_cuda"] = str(worker_device(cfg))
            finally:
                torch.cuda.is_available = real
            return out

        return app

    return client_app_fn


def _place(cfg) -> list[dict]:
    """Flower's actor pool for the config's client_resources, filled to capacity, one probe per actor."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    from fedsim.simulate import ray_backend_config

    pool = BasicActorPool(ClientAppActor, ray_backend_config(cfg)["client_resources"], {})
    pool.add_actors_to_pool(pool.actors_capacity)
    replies = ray.get([a.run.remote(_probe(cfg), None, str(i), None) for i, a in enumerate(pool.pool)], timeout=180)
    for a in pool.pool:
        ray.kill(a)
    return [out for _, out, _ in replies]


@pytest.mark.ray  # ~16 s each: Ray with 2 logical GPUs, 8 actors; the second variant is slow
@pytest.mark.parametrize("ray_sets_visible", [pytest.param(True, id="ray-sets-CUDA_VISIBLE_DEVICES"),
                                              pytest.param(False, id="noset", marks=pytest.mark.slow)])
def test_logical_gpus_take_four_workers_each_with_distinct_ids(ray_tmpdir, monkeypatch, ray_sets_visible):
    import ray

    if not ray_sets_visible:  # Ray leaves CUDA_VISIBLE_DEVICES alone: the worker must map the id itself
        monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    cfg = load_config(SMOKE, [*GPU_SIM, "simulation.num_cpus=0.25", "run.device=auto"])
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env=_pythonpath())
    try:
        placed = _place(cfg)
    finally:
        ray.shutdown()
    assert len(placed) == 8 and len({p["pid"] for p in placed}) == 8  # min(2 / 0.25 GPUs, 2 / 0.25 CPUs) actors
    per_gpu = collections.Counter(tuple(p["gpu_ids"]) for p in placed)
    assert per_gpu == {("0",): 4, ("1",): 4}  # four workers per GPU, two distinct GPUs
    assert all(p["device"] == "cpu" for p in placed)  # no CUDA here: the logical GPU falls back to the CPU
    for p in placed:
        gid = p["gpu_ids"][0]
        if ray_sets_visible:  # the assigned GPU is the process's only visible one
            assert p["visible"] == gid and p["device_with_cuda"] == "cuda:0"
        else:  # every GPU visible: the assigned one by its id, not a fixed cuda:0
            assert p["visible"] is None and p["device_with_cuda"] == f"cuda:{gid}"


@pytest.mark.ray
@pytest.mark.slow  # ~14 s: a ULS run whose Ray actors each build the model
def test_a_uls_run_on_logical_gpus_completes_on_the_cpu(ray_tmpdir, tmp_path):
    """fedsim run with simulation.num_gpus on a Ray the caller started with logical GPUs: accepted (a
    GPU request on a machine without CUDA is refused only when fedsim would start Ray itself), placed
    by Ray, trained on the CPU, and said so."""
    import ray

    from fedsim.errors import FedsimError
    from fedsim.loop import run_uls
    from fedsim.rundir import read_diagnostics
    from fedsim.simulate import check_devices

    cfg = load_config(SMOKE, [*GPU_SIM, "simulation.num_cpus=1", "run.device=auto", "run.rounds=2",
                              f"run.output_dir={tmp_path}"])
    if not torch.cuda.is_available():
        with pytest.raises(FedsimError, match="simulation.num_gpus=0.25 but no CUDA"):
            check_devices(cfg)  # the user-facing refusal when fedsim would start Ray itself
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env=_pythonpath())
    said: list[str] = []
    try:
        run_dir, summary = run_uls(cfg, say=said.append)
    finally:
        ray.shutdown()
    assert summary["steps"] == 2 and summary["stop_reason"] == "completed planned rounds"
    rows = read_diagnostics(run_dir)
    assert all(r["dropped_replies"] == 0 and r["failed_users"] == 0 for r in rows[1:])
    assert sum(r["users"] for r in rows[1:]) == sum(r["cohort"] for r in rows[1:]) > 0
    assert any("2 logical GPU(s)" in s and "train on the CPU" in s for s in said)


@pytest.mark.ray
@pytest.mark.slow  # ~17 s: a two-node cluster, 8 actors
def test_the_same_config_on_a_cluster_spreads_workers_over_nodes(ray_tmpdir):
    import ray
    from ray.cluster_utils import Cluster

    from fedsim.simulate import _shutdown_ray, connect_ray_cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        cfg = load_config(SMOKE, [*GPU_SIM, "simulation.num_cpus=0.25", "run.device=auto",
                                  f"simulation.ray_address={cluster.address}"])
        described = connect_ray_cluster(cfg)  # what `fedsim run` does with simulation.ray_address
        try:
            assert (described["nodes"], described["gpus"], described["actors"]) == (2, 2.0, 8)
            placed = _place(cfg)
        finally:
            _shutdown_ray()  # disconnects; the cluster is this test's to stop
    finally:
        cluster.shutdown()
    assert len(placed) == 8
    per_node = collections.Counter(p["node"] for p in placed)
    assert len(per_node) == 2 and set(per_node.values()) == {4}  # both nodes, four workers on each one's GPU
    assert collections.Counter((p["node"], tuple(p["gpu_ids"])) for p in placed) == {
        (n, ("0",)): 4 for n in per_node}  # each node's own GPU 0
    assert all(p["device"] == "cpu" and p["device_with_cuda"] == "cuda:0" for p in placed)
    assert not ray.is_initialized()
