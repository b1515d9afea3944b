"""Every use of another library's private or internal API, in one place.

fedsim relies on a few internals that the libraries do not promise to keep:

| library | internal used | where it serves |
| --- | --- | --- |
| flwr 1.41.0 | `flwr.supercore.task_identity.TaskIdentity` globals | messages outside a SuperLink (the in-process grid) |
| flwr 1.41.0 | `RayBackend` (swapped by name) and its actor pool's `_future_to_actor`, `pool`, `create_actor_fn` | replacing a dead Ray actor |
| ray 2.55.1 | `ray._private.parameter.RayParams` (`no_monitor`, `include_log_monitor`) | a local Ray without the autoscaler monitor and the log monitor (~160 MB) |
| flwr 1.41.0 | `vce_api.add_messages_to_queue` (swapped by name), `InMemoryGrid.pull_interval` | polling Flower's message queues every 2 ms, not 0.1 s, when a round has few nodes |
| dp-accounting 0.6.0 | `rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian` | RDP of the Poisson-subsampled Gaussian (LMO-faithful composition) |
| dp-accounting 0.6.0 | `PLDAccountant._maybe_compose`, `_pld`, `_value_discretization_interval` | the `pld` accountant composing memoised per-release PLDs |
| opacus 1.6.0 | `GradSampleModule._close` | removing Opacus' hooks (ELS `per_example: opacus`) |
| prv-accountant 0.2.0 | `composers`, `discretisers`, `domain.Domain`, `accountant.compute_safe_domain_size`, `privacy_random_variables` classes | the PRV accountant's own composition steps (`fedsim/privacy/prv.py`) |

Each accessor first checks that the installed version is the one fedsim was tested with
(`TESTED`, the pins of pyproject.toml) and otherwise raises `UntestedVersionError`, a one-line
error, so an upgrade fails loudly here instead of misbehaving somewhere else. This module
imports nothing from fedsim but its errors: every layer may use it.
"""

from __future__ import annotations

import importlib.metadata
import logging
from types import SimpleNamespace

from fedsim.errors import FedsimError

#: the versions whose internals fedsim was written and tested against (pyproject.toml pins them)
TESTED = {"flwr": "1.41.0", "ray": "2.55.1", "dp-accounting": "0.6.0", "opacus": "1.6.0", "prv-accountant": "0.2.0"}


class UntestedVersionError(FedsimError):
    """An installed library's version is not the one whose internals fedsim uses."""


def require_tested(dist: str) -> None:
    """Raise UntestedVersionError unless `dist` is installed at its TESTED version."""
    installed = importlib.metadata.version(dist)
    if installed != TESTED[dist]:
        raise UntestedVersionError(
            f"fedsim uses internals of {dist} {TESTED[dist]}, but {dist} {installed} is installed: install"
            f" {dist}=={TESTED[dist]} (as pyproject.toml pins it), or port fedsim/compat.py to {installed}")


# -- flwr ---------------------------------------------------------------------------------------
def set_message_ids_outside_a_superlink() -> None:
    """Flower Messages need run/node/task ids, which only a SuperLink sets: set them to 0."""
    require_tested("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for attr_name in ("run_id", "node_id", "task_id"):
        try:
            getattr(TaskIdentity, attr_name)
        except RuntimeError:
            setattr(TaskIdentity, attr_name, 0)


class _DeadActorSafeBackend:
    """Mixin over Flower 1.41's `RayBackend`: a Ray actor whose process died mid-message is
    replaced by a fresh one.

    Flower's `process_message` puts the actor of a failed message back into its pool even
    when that actor's process is gone, so every later message given to it fails too (measured:
    one injected kill in a round of 8 lost 7 replies, and every later round lost all but one).
    Here the message whose worker died still fails (the strategy drops that one reply and
    counts it; it is not retried, so it can never be summed twice), the dead actor leaves the
    pool and a new one takes its slot, so the next messages are served normally.
    """

    def process_message(self, message, context):
        import ray
        from flwr.common.constant import PARTITION_ID_KEY

        pool = self.pool
        if pool is None or self.app_fn is None or not hasattr(pool, "_future_to_actor"):
            return super().process_message(message, context)
        future = pool.submit(lambda a, a_fn, mssg, cid, state: a.run.remote(a_fn, mssg, cid, state),
                             (self.app_fn, message, str(context.node_config[PARTITION_ID_KEY]), context))
        try:
            return pool.fetch_result_and_return_actor_to_pool(future)
        except ray.exceptions.RayActorError:
            dead = pool._future_to_actor.pop(future, None)
            try:
                if dead is not None:
                    ray.kill(dead)
            except Exception:  # already gone
                pass
            pool.pool.append(pool.create_actor_fn())  # a fresh actor in the dead one's slot
            logging.getLogger("fedsim").warning("a Ray worker died while handling a message; it was replaced"
                                                " and its reply is dropped (counted in dropped_replies)")
            raise
        except Exception:
            pool.add_actor_back_to_pool(future)  # the actor is alive: the ClientApp itself failed
            raise


class replacing_dead_ray_actors:
    """Context manager: Flower's simulation engine builds `_DeadActorSafeBackend` instead of
    its `RayBackend` (it imports the class by name when the run starts)."""

    def __enter__(self):
        require_tested("flwr")
        import flwr.server.superlink.fleet.vce.backend.raybackend as rb

        self._module, self._original = rb, rb.RayBackend
        rb.RayBackend = type("FedsimRayBackend", (_DeadActorSafeBackend, rb.RayBackend), {})
        return self

    def __exit__(self, *exc):
        self._module.RayBackend = self._original
        return False


#: Flower's simulation engine polls for messages every 0.1 s; with at most this many nodes
#: (cohort workers) fedsim polls every `FAST_POLL_SECONDS` instead. With a node per user (2,000
#: nodes) one poll walks every node, so there Flower's 0.1 s stays.
FAST_POLL_MAX_NODES = 64
FAST_POLL_SECONDS = 0.002


def poll_interval(num_nodes: int) -> float | None:
    """The message-poll interval fedsim uses for `num_nodes` Flower nodes (None: Flower's own)."""
    return FAST_POLL_SECONDS if num_nodes <= FAST_POLL_MAX_NODES else None


def set_grid_poll_interval(grid, seconds: float | None) -> None:
    """Flower's in-memory grid sleeps `pull_interval` (0.1 s) between looks for replies."""
    if seconds is not None and hasattr(grid, "pull_interval"):
        require_tested("flwr")
        grid.pull_interval = seconds


class polling_messages_every:
    """Context manager: Flower 1.41's simulation engine takes messages out of its LinkState in
    a thread that waits 0.1 s between looks (`vce_api.add_messages_to_queue`), and its grid
    looks for replies every 0.1 s: on average ~0.1 s of idle latency per round, which is 5% of
    a 2 s round of cohort workers (measured on the shared workload, bench/shared_workload.py).
    Here the same loop runs with `seconds` between looks (None: Flower's loop unchanged)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds

    def __enter__(self):
        if self.seconds is None:
            return self
        require_tested("flwr")
        from flwr.server.superlink.fleet.vce import vce_api

        self._module, self._original = vce_api, vce_api.add_messages_to_queue
        seconds = self.seconds

        def add_messages_to_queue(state, queue, nodes_mapping, f_stop):  # Flower 1.41's loop, shorter wait
            while not f_stop.is_set():
                for node_id in nodes_mapping:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
                f_stop.wait(seconds)

        vce_api.add_messages_to_queue = add_messages_to_queue
        return self

    def __exit__(self, *exc):
        if self.seconds is not None:
            self._module.add_messages_to_queue = self._original
        return False


# -- ray -----------------------------------------------------------------------------------------
class lean_local_ray:
    """Context manager around `ray.init` of a *local* Ray: its head starts without the
    autoscaler monitor (nothing to autoscale on one machine) and without the log monitor
    (fedsim passes `log_to_driver=False` unless simulation.verbose, so nothing reads what it
    forwards): ~80 MB each (bench/ray_memory.py). `ray.init` has no argument for either, so the
    defaults of its private `RayParams` are set for the duration. `log_monitor`: keep it
    (verbose runs show the workers' logs)."""

    def __init__(self, log_monitor: bool = False):
        self.log_monitor = log_monitor

    def __enter__(self):
        require_tested("ray")
        from ray._private import parameter

        self._cls, self._original = parameter.RayParams, parameter.RayParams.__init__
        original, log_monitor = self._original, self.log_monitor

        def __init__(params, *args, **kwargs):
            original(params, *args, **kwargs)
            params.no_monitor = True
            if not log_monitor:
                params.include_log_monitor = False

        self._cls.__init__ = __init__
        return self

    def __exit__(self, *exc):
        self._cls.__init__ = self._original
        return False


# -- dp-accounting --------------------------------------------------------------------------------
def rdp_poisson_subsampled_gaussian(q: float, noise_multiplier: float, orders):
    """dp_accounting's RDP of the Poisson-subsampled Gaussian at `orders`."""
    require_tested("dp-accounting")
    from dp_accounting.rdp import rdp_privacy_accountant

    return rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, noise_multiplier, orders)


_MEMO_PLD_CLASS = None


def memoised_pld_accountant(value_discretization_interval: float, leaf_pld):
    """dp_accounting's PLDAccountant whose releases are composed from `leaf_pld(event, interval)`
    (a PLD the caller memoises, built as the library builds it) when that is not None; every
    other event goes through the library unchanged. It overrides the private `_maybe_compose`
    and reads `_pld` and `_value_discretization_interval`."""
    global _MEMO_PLD_CLASS
    require_tested("dp-accounting")
    if _MEMO_PLD_CLASS is None:
        from dp_accounting.pld import pld_privacy_accountant

        class MemoPLDAccountant(pld_privacy_accountant.PLDAccountant):
            leaf_pld = None  # set per instance below

            def _maybe_compose(self, event, count, do_compose):
                leaf = self.leaf_pld(event, self._value_discretization_interval) if do_compose else None
                if leaf is None:
                    return super()._maybe_compose(event, count, do_compose)
                self._pld = self._pld.compose(leaf.self_compose(count))
                return None

        _MEMO_PLD_CLASS = MemoPLDAccountant
    acc = _MEMO_PLD_CLASS(value_discretization_interval=value_discretization_interval)
    acc.leaf_pld = leaf_pld
    return acc


# -- opacus ----------------------------------------------------------------------------------------
def close_grad_sample_module(gsm) -> None:
    """Remove Opacus' hooks from the wrapped model (GradSampleModule has no public close)."""
    require_tested("opacus")
    gsm._close()


# -- prv-accountant --------------------------------------------------------------------------------
def prv_accountant_internals() -> SimpleNamespace:
    """The modules and classes of prv_accountant's composition steps that fedsim's PRV accountant
    reuses (imported lazily: prv_accountant pulls scipy.signal)."""
    require_tested("prv-accountant")
    from prv_accountant import composers, discretisers
    from prv_accountant.accountant import compute_safe_domain_size
    from prv_accountant.domain import Domain
    from prv_accountant.privacy_random_variables import (
        GaussianMechanism,
        PoissonSubsampledGaussianMechanism,
        PrivacyRandomVariable,
        PrivacyRandomVariableTruncated,
    )

    return SimpleNamespace(composers=composers, discretisers=discretisers, Domain=Domain,
                           compute_safe_domain_size=compute_safe_domain_size, GaussianMechanism=GaussianMechanism,
                           PoissonSubsampledGaussianMechanism=PoissonSubsampledGaussianMechanism,
                           PrivacyRandomVariable=PrivacyRandomVariable,
                           PrivacyRandomVariableTruncated=PrivacyRandomVariableTruncated)
