"""`LmoMechanism`: LMO noise through fedsim's `NoiseMechanism` interface."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from dp_accounting import dp_event

from fedsim.privacy.lmo.faithful import LmoDpEvent, check_dimension, lmo_els_step_event
from fedsim.privacy.lmo.params import LmoParams
from fedsim.privacy.lmo.sampler import sample_lmo_noise
from fedsim.privacy.mechanisms import NoiseMechanism


class LmoMechanism(NoiseMechanism):
    """``C * Laplace(0, 1/t_i)`` added to each coordinate of the clipped sum, t_i i.i.d. LMO rates
    (`params`: unit-sensitivity). `dimension` (number of noised coordinates, optional) sharpens the
    accounting when small. Accounting: ``lmo_faithful`` (:class:`LmoFaithfulAccountant`)."""

    name = "lmo"
    default_accountant = "lmo_faithful"
    config_key = "lmo"
    needs_dimension = True

    def __init__(self, clip_norm: float, params: LmoParams | Mapping, dimension: int | None = None):
        super().__init__(clip_norm)
        self.params = params if isinstance(params, LmoParams) else LmoParams.from_dict(params)
        check_dimension(dimension)
        self.dimension = dimension

    @classmethod
    def from_spec(cls, clip_norm: float, spec, dimension: int | None = None) -> "LmoMechanism | None":
        """`dp.lmo`: the 8 parameters, or ``{search: result.json}``; None when unset (calibrate)."""
        if not spec:
            return None
        if isinstance(spec, Mapping) and "search" in spec:
            return cls.from_search_result(clip_norm, spec["search"], dimension)
        return cls(clip_norm, spec, dimension)

    @classmethod
    def probe(cls, clip_norm: float) -> "LmoMechanism":
        return cls(clip_norm, LmoParams(a1=1.0, a3=1.0, a4=1.0, G_k=1.0, G_theta=1.0, E_lambda=1.0, U_a=0.0, U_b=1.0))

    @classmethod
    def calibrated(cls, clip_norm: float, *, target_epsilon: float, delta: float, q: float, steps: int,
                   k: int | None = None, accountant: str = "lmo_faithful", dimension: int | None = None,
                   cache=None, objective: str = "variance", **search_options) -> "LmoMechanism":
        """The best LMO noise (by `objective`) whose `steps` ULS rounds (k None) or ELS steps (k examples
        per user) meet (target_epsilon, delta), by `fedsim.privacy.lmo.search` (`cache`, `search_options`)."""
        from fedsim.privacy.lmo.search import search

        res = search(target_epsilon, delta, q, steps, dimension, objective, accountant=accountant,
                     k=1 if k is None else k, cache=cache, **search_options)
        return cls(clip_norm, res.params, dimension)

    @classmethod
    def from_search_result(cls, clip_norm: float, result, dimension: int | None = None) -> "LmoMechanism":
        """From a search result: an `LmoSearchResult`, its dict / JSON file (``{"params": {...}}``),
        or a bare parameter mapping."""
        if isinstance(getattr(result, "params", None), LmoParams):
            params, found = result.params, getattr(result, "dimension", None)
        else:
            if isinstance(result, (str, Path)):
                try:
                    result = json.loads(Path(result).read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as exc:
                    raise ValueError(f"cannot read LMO search result {result}: {exc}") from None
            if not isinstance(result, Mapping):
                raise ValueError("an LMO search result must be a mapping with a 'params' entry")
            params = LmoParams.from_dict(result.get("params", result), strict=False)
            setting = result.get("setting")
            found = setting.get("dimension") if isinstance(setting, Mapping) else None
        return cls(clip_norm, params, found if dimension is None else dimension)

    def sample_noise(self, stream, n: int) -> torch.Tensor:
        return sample_lmo_noise(self.params, stream, n, scale=self.clip_norm)

    def noise_std(self) -> float:
        return self.clip_norm * self.params.noise_std()

    def grid_scale(self) -> float:
        # the Laplace scale at the mean rate: finite even when the noise variance is not
        return self.clip_norm / self.params.mean_t()

    def dp_event(self) -> dp_event.DpEvent:
        return LmoDpEvent.from_params(self.params, self.dimension)

    def mixture_event(self, k: int, q: float) -> dp_event.DpEvent:
        """One ELS step: the release shifted by m C, m ~ Binomial(k, q) (an `LmoMixtureDpEvent`)."""
        return lmo_els_step_event(self.dp_event(), k, q)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "lmo_params": self.params.to_dict(),
            "dimension": self.dimension,
            "expected_abs_noise": self.clip_norm * self.params.expected_magnitude(),
            "accounting": "lmo_faithful: per-coordinate mixture-density Renyi divergences, worst case over the"
                          " L2 ball, Poisson subsampling (both directions), RDP composition, CKS conversion",
            "paper_accounting": "not used (fedsim.privacy.lmo.paper_epsilon reproduces it for comparison only)",
        }
