"""Experiment configuration: pydantic models, YAML in, strict dotted overrides.

Every default lives here with its meaning and units (as at the top of nanoGPT's
train.py). `load_config(path, overrides=["dp.epsilon=2"])` reads a YAML file, applies
`--set` overrides (unknown keys are refused, values type-checked by pydantic) and
returns an `ExperimentConfig`. An invalid value raises `ConfigError` naming the key
and the allowed range.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsim.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: Literal["shakespeare", "files", "synthetic"] = "shakespeare"  # where users come from
    public_plays: int = Field(5, ge=0, le=30)  # shakespeare: whole plays kept apart as public (pre-training) data
    min_examples: int = Field(4, ge=1)  # users with fewer examples (train + test) are left out
    test_fraction: float = Field(0.2, gt=0, lt=1)  # per-user held-out share of examples (the last ones)
    max_users: int | None = Field(None, ge=1)  # keep only the first N users (smoke tests)
    seq_len: int = Field(64, ge=8, le=4096)  # tokens per example (longer speeches are truncated)
    path: str | None = None  # files: a JSONL / CSV / Parquet file
    user_column: str = "user_id"  # files: the user-id column
    text_column: str = "text"  # files: the text column
    num_users: int = Field(1000, ge=1)  # synthetic: population size
    seed: int = 0  # data split / synthetic generation seed
    examples_per_user: int | None = Field(None, ge=1)  # synthetic: every user holds this many (train + test) instead of a power law
    max_examples: int = Field(1000, ge=1)  # synthetic: cap on a user's power-law example count (min_examples is the floor)
    max_example_bytes: int = Field(1 << 20, ge=1)  # files: longest text accepted per example, in UTF-8 bytes
    long_examples: Literal["error", "truncate"] = "error"  # files: a longer text is an error, or cut at max_example_bytes


class LoraConfig(_Strict):
    enabled: bool = True  # train LoRA adapters only (the base model stays frozen and never travels)
    r: int = Field(8, ge=1)  # adapter rank
    alpha: float = Field(16.0, gt=0)  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: the architecture's attention + MLP projections


class ArchConfig(_Strict):
    n_layer: int = Field(2, ge=1)
    n_embd: int = Field(128, ge=8)
    n_head: int = Field(2, ge=1)
    vocab_size: int | None = Field(None, ge=2)  # None: the tokenizer's (bytes: 257); larger widens embedding + LM head (50257: GPT-2's), unused ids never occur


class PretrainConfig(_Strict):
    enabled: bool = True  # pre-train on the public plays first (cached), the paper's public/private setting
    steps: int = Field(300, ge=0)  # optimizer steps of the public pre-training
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)  # Adam learning rate


class ModelConfig(_Strict):
    source: Literal["config", "local"] = "config"  # config: GPT-2 style from `arch`, random init; local: a directory
    path: str | None = None  # local: a HF model directory (config.json + weights) or a GGUF's directory
    gguf_file: str | None = None  # local: the GGUF file name inside `path` (needs the `gguf` package)
    arch: ArchConfig = ArchConfig()
    lora: LoraConfig = LoraConfig()
    pretrain: PretrainConfig = PretrainConfig()
    dtype: Literal["float32", "bfloat16"] = "float32"  # autocast dtype for forward passes on CUDA


class UlsConfig(_Strict):
    expected_cohort: float = Field(50.0, gt=0)  # q * N: expected users per round (q = expected_cohort / users); the update's public denominator
    # q set directly (then the population size N need not be public): each user joins a round with
    # this probability, and the sum is still divided by expected_cohort (a public constant)
    sampling_rate: float | None = Field(None, gt=0, le=1)
    local_epochs: int = Field(1, ge=1)  # passes over the user's examples (unless local_steps is set)
    local_steps: int | None = Field(None, ge=1)  # fixed number of local batches instead of epochs
    max_examples_per_user: int | None = Field(None, ge=1)  # cap a user's training examples (seeded choice)
    batch_size: int = Field(8, ge=1)  # local batch size
    client_optimizer: Literal["sgd", "adam"] = "sgd"
    client_lr: float = Field(0.5, gt=0)
    server_optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)  # momentum: heavy-ball coefficient; adam: beta1
    users_per_client: int = Field(1, ge=1)  # >1: scale mode, a Flower client trains a list of users and returns the sum
    # Vectorised users (fedsim/training/vectorised.py): a worker trains `vector_users` users in ONE
    # forward/backward over their stacked batches, per-user gradient sums through layer hooks; the
    # clipped sum equals the back-to-back path to float tolerance. Needs client_optimizer sgd; users
    # whose local plan is not exactly one batch are trained back to back (logged, counted).
    vectorise: bool = False
    vector_users: int = Field(32, ge=1)  # users per grouped pass (memory ~ vector_users x trainable weights x 3 floats)


class ElsConfig(_Strict):
    """ELS: centralized DP-SGD with example-level Poisson sampling and a user-level accountant."""

    k: int = Field(16, ge=1)  # examples kept per user (seeded choice); the group size of the user-level accountant
    expected_batch: float = Field(64.0, gt=0)  # q * (capped examples): expected examples per step; the public denominator
    # q set directly (then the number of kept examples need not be public); the noisy sum is
    # still divided by expected_batch (a public constant)
    sampling_rate: float | None = Field(None, gt=0, le=1)
    steps: int | None = Field(None, ge=1)  # planned steps; None: match ULS's planned compute (see compare.budget)
    clip_norm: float | None = Field(None, gt=0)  # per-example gradient L2 clip C (None: dp.clip_norm)
    optimizer: Literal["sgd", "momentum", "adam"] = "sgd"  # the server-optimizer family ULS uses, on the noisy mean gradient
    lr: float = Field(0.5, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # momentum: heavy-ball coefficient; adam: beta1
    per_example: Literal["auto", "hooks", "vmap", "opacus"] = "auto"  # per-example gradients (auto: hooks, else vmap)
    micro_batch: int = Field(256, ge=1)  # examples per forward pass (a Poisson batch can exceed its expectation)
    eval_every: int = Field(50, ge=1)  # steps between evaluations (and at the end)
    accounting_interval: float = Field(1e-2, gt=0, le=0.1)  # PLD discretisation of the mixture (coarser: faster, looser, still an upper bound)


class CompareConfig(_Strict):
    """`fedsim compare`: ULS vs ELS at the same (epsilon, delta) and compute budget."""

    budget: int | None = Field(None, ge=1)  # example-gradient evaluations per method; None: ULS's planned compute (run.rounds)
    name: str = "compare"  # comparison directory <run.output_dir>/<name>


class MeanEstimationConfig(_Strict):
    """The synthetic mean-estimation study (fedsim/models/mean_estimation.py, bench/mean_estimation_sweep.py)."""

    dim: int = Field(32, ge=1)  # d
    examples_per_user: int = Field(16, ge=1)  # m (every user); ELS keeps k <= m of them
    heterogeneities: list[float] = [0.0, 0.9]  # h: share of an example's variance that is between users (swept)
    seeds: int = Field(3, ge=1)  # replicas averaged per setting
    epsilons: list[float] = [1.0, 4.0, 16.0]  # user-level budgets (swept)
    budgets: list[int] = [4000, 32000, 256000]  # per-example gradient evaluations per method (swept)
    uls_cohorts: list[float] = [50.0, 100.0, 200.0, 400.0]  # ULS expected cohorts tried (best kept)
    uls_examples_per_user: list[int] = [1, 4, 16]  # ULS examples a sampled user trains on, tried (best kept)
    uls_local_epochs: int = Field(1, ge=1)  # full-batch local GD epochs (local lr 1: one epoch gives the user mean)
    els_k: list[int] = [1, 4, 16]  # ELS examples per user tried (best kept)
    els_batches: list[float] = [100.0, 400.0]  # ELS expected batches tried (best kept)
    lrs: list[float] = [0.1, 0.3, 1.0, 3.0]  # ULS server / ELS learning rates tried (best kept)
    clip_norms: list[float] = [0.25, 0.5, 1.0]  # clip norms tried, for both methods (best kept)
    accounting_interval: float = Field(2e-2, gt=0, le=0.1)  # PLD discretisation for the ELS mixture calibrations


class DpConfig(_Strict):
    epsilon: float | None = Field(8.0, gt=0)  # target user-level epsilon for the planned rounds (None: non-private)
    delta: float | None = Field(None, gt=0, lt=1)  # None: min(1e-5, 1 / N^1.1) for N users
    clip_norm: float = Field(1.0, gt=0)  # per-user L2 clipping norm C of the model delta
    noise_multiplier: float | None = Field(None, ge=0)  # set to skip calibration (0: no noise, epsilon = inf)
    accountant: Literal["pld", "rdp", "prv", "edgeworth", "lmo_faithful"] = "pld"  # the accountant that reports epsilon
    mechanism: Literal["gaussian", "lmo"] = "gaussian"
    lmo: dict[str, Any] | None = None  # lmo: parameters, or {"search": path-to-search-result.json}
    # true: cohorts, ELS samples and noise are derived from run.seed (tests and debugging only: anyone
    # with config.yaml can regenerate them, so the reported epsilon does not hold); false: a fresh
    # 256-bit OS-entropy key per process (fedsim/privacy/randomness.py)
    reproducible: bool = False


class FaultConfig(_Strict):
    """Fault injection for tests and demos: each Flower message fails with these rates."""

    raise_rate: float = Field(0.0, ge=0, le=1)  # the client raises (Flower error reply)
    nan_rate: float = Field(0.0, ge=0, le=1)  # the client returns a NaN delta sum
    shape_rate: float = Field(0.0, ge=0, le=1)  # the client returns a wrongly shaped array
    kill_rate: float = Field(0.0, ge=0, le=1)  # the worker process dies (only inside a Ray actor)
    hang_rate: float = Field(0.0, ge=0, le=1)  # the client sleeps `hang_seconds` before replying (a timeout)
    hang_seconds: float = Field(5.0, gt=0)  # longer than simulation.timeout makes the reply miss its round
    server_crash_round: int | None = Field(None, ge=1)  # the server SIGKILLs itself right after recording this round's release
    seed: int = 0

    def rates(self) -> list[tuple[str, float]]:
        """(fault kind, rate) of every per-message fault, in the order `inject_fault` draws them."""
        return [(kind, getattr(self, f"{kind}_rate")) for kind in ("raise", "nan", "shape", "kill", "hang")]

    @model_validator(mode="after")
    def _rates_sum_to_at_most_one(self):
        total = sum(rate for _, rate in self.rates())
        if total > 1:
            raise ValueError(f"the fault rates add up to {total:g}; a message suffers at most one fault, so at most 1")
        return self


class SimulationConfig(_Strict):
    backend: Literal["ray", "inprocess"] = "ray"  # ray: Flower's simulation engine; inprocess: same logic, no Ray (debug)
    num_cpus: float = Field(1.0, gt=0)  # per Flower client (actor)
    num_gpus: float = Field(0.0, ge=0)  # per actor, fractional allowed (0.25 = four actors per GPU)
    num_workers: int | None = Field(None, ge=1)  # scale mode: number of Flower nodes (default: one per CPU)
    ray_address: str | None = None  # join an existing Ray cluster: "HEAD_IP:6379" (the GCS address `ray start --head` prints) or "auto"
    timeout: float = Field(600.0, gt=0)  # seconds to wait for a round's replies
    verbose: bool = False  # Flower / Ray logs on the console
    faults: FaultConfig = FaultConfig()


class RunConfig(_Strict):
    name: str = "run"
    output_dir: str = "runs"  # a run directory <output_dir>/<name> is created (never overwritten)
    rounds: int = Field(30, ge=1)  # planned rounds (ULS); the budget is calibrated for these
    seed: int = 0
    eval_every: int = Field(5, ge=1)
    eval_examples: int = Field(512, ge=1)  # held-out examples used for evaluation (fixed seeded subset)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    checkpoint_every: int = Field(0, ge=0)  # write an atomic checkpoint every N rounds (0: never); `fedsim run --resume DIR`
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per process (None: 1, best for small per-user batches)


class ExperimentConfig(_Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    uls: UlsConfig = UlsConfig()
    dp: DpConfig = DpConfig()
    simulation: SimulationConfig = SimulationConfig()
    els: ElsConfig = ElsConfig()
    compare: CompareConfig = CompareConfig()
    mean_estimation: MeanEstimationConfig = MeanEstimationConfig()

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        if self.model.source == "local" and not self.model.path:
            raise ValueError("model.path is required when model.source is 'local'")
        if self.data.source == "files" and not self.data.path:
            raise ValueError("data.path is required when data.source is 'files'")
        if self.model.arch.n_embd % self.model.arch.n_head:
            raise ValueError("model.arch.n_embd must be divisible by model.arch.n_head")
        if self.uls.vectorise and self.uls.client_optimizer != "sgd":
            raise ValueError("uls.vectorise needs uls.client_optimizer sgd (one SGD step is a per-user gradient)")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if err["type"] == "extra_forbidden" or not err["loc"]:  # a whole-config check: its input is the config
            parts.append(f"{key}: {msg}")
        else:
            parts.append(f"{key}: {msg} (got {err.get('input')!r})")
    return f"invalid config {source}: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=1' -> (['a', 'b'], 1). The value is parsed as YAML (numbers, bools, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for ov in overrides:
        path, value = parse_override(ov)
        node = raw
        for p in path[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
            node = node[p]
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw: dict = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
        except yaml.YAMLError as exc:  # one line: the problem and where
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML ({where}{problem})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def config_from_json(text: str) -> ExperimentConfig:
    return ExperimentConfig.model_validate(json.loads(text))
