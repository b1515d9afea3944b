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
