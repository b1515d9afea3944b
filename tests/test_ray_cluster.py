"""fedsim on an existing Ray cluster: a head node started with the `ray start` CLI (as on
a real cluster, README "Running on a Ray cluster"), and a tiny ULS job pointed at its
address with `simulation.ray_address`.

The cluster is stopped by the process that started it, never with `ray stop`: `ray stop`
kills every Ray process on the machine (other people's runs included). `ray start
--block` keeps the head's launcher in the foreground; SIGTERM makes it stop every process
it started, and anything left in its own session is killed by process group.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedsim.config import load_config
from fedsim.rundir import read_diagnostics
from fedsim.loop import run_uls

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names our private temp dir or port: only ours."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.fixture
def ray_head():
    """A one-node Ray cluster (2 CPUs) from the CLI, on free ports and a private temp dir."""
    port, client_port, agent_port = _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="fsray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = open(Path(temp) / "ray_start.log", "w+")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", f"--temp-dir={temp}", f"--ray-client-server-port={client_port}",
         f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        deadline = time.time() + 60
        while True:
            log.seek(0)
            text = log.read()
            if "Ray runtime started" in text:
                break
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{text[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: the launcher stops the processes it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        time.sleep(1)
        for pid in set(_pids_mentioning(temp)) | set(_pids_mentioning(f":{port} ")):
            try:
                os.kill(pid, signal.SIGKILL)  # a straggler of this cluster (its cmdline names our dir/port)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_tiny_uls_job_runs_on_a_cluster_started_with_the_ray_cli(ray_head, tmp_path):
    cfg = load_config("configs/smoke.yaml", [
        f"run.output_dir={tmp_path}", "simulation.backend=ray", f"simulation.ray_address={ray_head}",
        "run.rounds=2", "uls.users_per_client=3",  # cohort workers: 2 actors on the 2-CPU head
    ])
    said: list[str] = []
    run_dir, summary = run_uls(cfg, say=said.append)
    # the run completed
    assert summary["steps"] == 2 and summary["stop_reason"] == "completed planned rounds"
    assert 0 < summary["epsilon"] <= 8.0 and math.isfinite(summary["eval_loss_after"])
    rows = read_diagnostics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["dropped_replies"] == 0 for r in rows[1:])
    assert sum(r["users"] for r in rows[1:]) == sum(r["cohort"] for r in rows[1:])
    # ...on that cluster: the GCS address we started, its one node and 2 CPUs, 2 actor slots
    cl = json.loads((run_dir / "summary.json").read_text())["ray_cluster"]
    assert cl["address"].endswith(":" + ray_head.rsplit(":", 1)[1])
    assert cl["nodes"] == 1 and cl["cpus"] == 2 and cl["actors"] == 2
    assert any("Ray cluster" in s and "1 node" in s for s in said)
    import ray

    assert not ray.is_initialized()  # the driver disconnected; the cluster is the fixture's to stop
