"""fedsim/compat.py: every use of another library's internals fails loudly on an untested version."""

import importlib.metadata

import pytest

from fedsim import compat
from fedsim.compat import TESTED, UntestedVersionError


def test_the_installed_versions_are_the_tested_ones():
    for dist, version in TESTED.items():
        assert importlib.metadata.version(dist) == version, dist


@pytest.mark.parametrize("dist,call", [
    ("flwr", lambda: compat.set_message_ids_outside_a_superlink()),
    ("flwr", lambda: compat.replacing_dead_ray_actors().__enter__()),
    ("flwr", lambda: compat.polling_messages_every(0.002).__enter__()),
    ("ray", lambda: compat.lean_local_ray().__enter__()),
    ("dp-accounting", lambda: compat.rdp_poisson_subsampled_gaussian(0.01, 1.0, [2.0])),
    ("dp-accounting", lambda: compat.memoised_pld_accountant(1e-3, None)),
    ("opacus", lambda: compat.close_grad_sample_module(None)),
    ("prv-accountant", lambda: compat.prv_accountant_internals()),
])
def test_each_internal_refuses_an_untested_version(monkeypatch, dist, call):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "99.0.0" if d == dist else real(d))
    with pytest.raises(UntestedVersionError, match=f"{dist} 99.0.0 is installed"):
        call()


def test_an_untested_version_stops_an_accountant_with_a_one_line_error(monkeypatch):
    from fedsim.privacy.accounting import compute_epsilon, poisson_gaussian_event

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "0.7.0" if d == "dp-accounting" else real(d))
    with pytest.raises(UntestedVersionError, match="pyproject.toml"):
        compute_epsilon(poisson_gaussian_event(0.01, 1.0, 10), 1e-6, "pld")


def test_flowers_message_poll_waits_two_ms_with_few_nodes_and_is_restored():
    """Flower 1.41 waits 0.1 s between looks for new messages (~0.1 s idle per round with
    cohort workers); inside `polling_messages_every` the same loop waits the given time."""
    from flwr.server.superlink.fleet.vce import vce_api

    assert compat.poll_interval(2) == compat.FAST_POLL_SECONDS == 0.002
    assert compat.poll_interval(2000) is None  # a node per user: one poll walks every node, keep Flower's
    original = vce_api.add_messages_to_queue

    class Stop:  # records the wait and stops the loop after one pass
        waits: list = []

        def is_set(self):
            return bool(self.waits)

        def wait(self, seconds):
            self.waits.append(seconds)

    class State:
        def get_message_ins(self, node_id, limit):
            return [f"msg-{node_id}"]

    got = []

    class Queue:
        def put(self, msg):
            got.append(msg)

    with compat.polling_messages_every(0.002):
        assert vce_api.add_messages_to_queue is not original
        vce_api.add_messages_to_queue(State(), Queue(), {7: 0, 9: 1}, Stop())
    assert Stop.waits == [0.002] and got == ["msg-7", "msg-9"]
    assert vce_api.add_messages_to_queue is original
    with compat.polling_messages_every(None):  # many nodes: Flower's own loop
        assert vce_api.add_messages_to_queue is original


def test_the_grid_poll_interval_is_set_only_on_a_grid_that_has_one():
    class Grid:
        pull_interval = 0.1

    g = Grid()
    compat.set_grid_poll_interval(g, 0.002)
    assert g.pull_interval == 0.002
    compat.set_grid_poll_interval(object(), 0.002)  # the in-process grid: nothing to set


@pytest.mark.ray
def test_a_local_ray_starts_without_the_monitors_nothing_uses():
    """`lean_local_ray`: no autoscaler monitor, no log monitor (~160 MB, bench/ray_memory.py)."""
    import psutil
    import ray

    with compat.lean_local_ray():
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        cmds = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
        assert any("gcs_server" in c for c in cmds) and any("raylet" in c for c in cmds)
        assert not any("autoscaler/_private/monitor.py" in c or "log_monitor.py" in c for c in cmds), cmds
    finally:
        ray.shutdown()
    from ray._private.parameter import RayParams

    assert RayParams().no_monitor is False  # restored


def test_a_cohort_worker_does_not_import_the_accountants():
    """A Ray actor imports the client app, the worker and clipping: not dp_accounting/scipy's
    accountants (~30-90 MB per actor, bench/ray_memory.py)."""
    import subprocess
    import sys

    code = ("import sys, clients.client_app, fedsim.workers, fedsim.training.worker, fedsim.privacy.clipping;"
            " from fedsim.privacy import per_user_clip;"
            " print(sorted(m for m in ('dp_accounting', 'prv_accountant') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
