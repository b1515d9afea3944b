"""Experiment configuration: pydantic models, YAML in, strict dotted overrides.

Every default lives here with its meaning and units in the field's `description` (as at the
top of nanoGPT's train.py); `fedsim config show` and docs/config.md are generated from them
(fedsim/config_reference.py). `load_config(path, overrides=["dp.epsilon=2"])` reads a YAML
file, applies `--set` overrides (unknown keys are refused, values type-checked by pydantic)
and returns an `ExperimentConfig`. An invalid value raises `ConfigError` naming the key and
the allowed range.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsim.errors import ConfigError

#: json_schema_extra of a path-valued key: `load_config` makes it absolute (see `resolve_paths`)
PATH = {"path": True}


class _Strict(BaseModel):
    # inf is a valid value (the non-private reference's clip norm): keep it through JSON and YAML
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="constants")


class DataConfig(_Strict):
    """Users and their examples."""

    source: Literal["shakespeare", "files", "synthetic"] = Field(
        "shakespeare", description="where users come from: the embedded Shakespeare plays, a file, or generated")
    public_plays: int = Field(5, ge=0, le=30, description="shakespeare: whole plays kept apart as public"
                              " (pre-training) data")
    min_examples: int = Field(4, ge=1, description="users with fewer examples (train + test) are left out (and"
                              " reported)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="per-user held-out share of examples (the last ones)")
    max_users: int | None = Field(None, ge=1, description="keep only the first N users, in user order, after"
                                  " min_examples (smoke tests; None: all); the others are reported")
    seq_len: int = Field(64, ge=8, le=4096, description="tokens per example (longer speeches are truncated)")
    path: str | None = Field(None, json_schema_extra=PATH, description="files: the users' JSONL / CSV / Parquet file"
                             " (format by suffix: .jsonl .ndjson .json .csv .parquet .pq); relative: to the config"
                             " file's directory")
    public_path: str | None = Field(None, json_schema_extra=PATH, description="files: an optional JSONL / CSV /"
                                    " Parquet file of public texts (its text_column) for model.pretrain, like"
                                    " Shakespeare's public plays; relative: to the config file's directory")
    user_column: str = Field("user_id", description="files: the user-id column")
    text_column: str = Field("text", description="files: the text column")
    num_users: int = Field(1000, ge=1, description="synthetic: population size")
    seed: int = Field(0, description="data split, evaluation subset and synthetic generation seed (a sweep's"
                      " seeds vary run.seed only, so every seed is evaluated on the same examples)")
    examples_per_user: int | None = Field(None, ge=1, description="synthetic: every user holds this many (train +"
                                          " test) instead of a power law")
    max_examples: int = Field(1000, ge=1, description="synthetic: cap on a user's power-law example count"
                              " (min_examples is the floor)")
    max_example_bytes: int = Field(1 << 20, ge=1, description="files: longest text accepted per example (and"
                                   " public text), in UTF-8 bytes")
    long_examples: Literal["error", "truncate"] = Field(
        "error", description="files: a longer text is an error, or cut at max_example_bytes")


class LoraConfig(_Strict):
    """LoRA adapters (peft)."""

    enabled: bool = Field(True, description="train LoRA adapters only (the base model stays frozen and never"
                          " travels)")
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability on the adapters' input")
    target_modules: list[str] | None = Field(None, description="module names to adapt (None: the architecture's"
                                             " attention + MLP projections)")


class ArchConfig(_Strict):
    """The GPT-2 style architecture of `model.source: config`."""

    n_layer: int = Field(2, ge=1, description="transformer blocks")
    n_embd: int = Field(128, ge=8, description="embedding width (a multiple of n_head)")
    n_head: int = Field(2, ge=1, description="attention heads per block")
    vocab_size: int | None = Field(None, ge=2, description="token ids of the embedding and LM head (None: the"
                                   " tokenizer's, bytes: 257); larger widens both (50257: GPT-2's), unused ids"
                                   " never occur")


class PretrainConfig(_Strict):
    """Public pre-training before the private fine-tuning."""

    enabled: bool = Field(True, description="pre-train on the public data first (cached): Shakespeare's public"
                          " plays, or data.public_path; the paper's public/private setting")
    steps: int = Field(300, ge=0, description="optimizer steps of the public pre-training")
    batch_size: int = Field(32, ge=1, description="examples per pre-training step")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    # not run.seed: a sweep's seeds vary the private training (LoRA init, batches, noise), and all of
    # them fine-tune the same public checkpoint, as the paper's runs do
    seed: int = Field(0, description="seed of the public pre-training (the base model's init and its batches)")


class ModelConfig(_Strict):
    """The model and which of its weights are trained."""

    source: Literal["config", "local"] = Field("config", description="config: GPT-2 style from `arch`, random"
                                               " init; local: a directory")
    path: str | None = Field(None, json_schema_extra=PATH, description="local: a HF model directory (config.json +"
                             " weights) or a GGUF's directory, or package:NAME; relative: to the config file's"
                             " directory")
    gguf_file: str | None = Field(None, description="local: the GGUF file name inside `path` (needs the `gguf`"
                                  " package)")
    arch: ArchConfig = Field(ArchConfig(), description=ArchConfig.__doc__)
    lora: LoraConfig = Field(LoraConfig(), description=LoraConfig.__doc__)
    pretrain: PretrainConfig = Field(PretrainConfig(), description=PretrainConfig.__doc__)
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="autocast dtype for forward passes on"
                                                  " CUDA")


class UlsConfig(_Strict):
    """ULS: DP-FedAvg with Poisson user sampling and per-user clipping."""

    expected_cohort: float = Field(50.0, gt=0, description="q * N: expected users per round (q = expected_cohort"
                                   " / users); the update's public denominator")
    # set q directly and the population size N need not be public
    sampling_rate: float | None = Field(None, gt=0, le=1, description="q set directly: each user joins a round"
                                        " with this probability; the sum is still divided by expected_cohort (a"
                                        " public constant)")
    local_epochs: int = Field(1, ge=1, description="passes over the user's examples (unless local_steps is set)")
    local_steps: int | None = Field(None, ge=1, description="fixed number of local batches instead of epochs")
    max_examples_per_user: int | None = Field(None, ge=1, description="cap a user's training examples (seeded"
                                              " choice)")
    batch_size: int = Field(8, ge=1, description="local batch size")
    client_optimizer: Literal["sgd", "adam"] = Field("sgd", description="the optimizer of a user's local"
                                                     " training")
    client_lr: float = Field(0.5, gt=0, description="learning rate of a user's local training")
    server_optimizer: Literal["sgd", "momentum", "adam"] = Field("sgd", description="the server's optimizer on the"
                                                                " noisy mean delta")
    server_lr: float = Field(1.0, gt=0, description="the server optimizer's learning rate (sgd with 1: FedAvg)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="momentum: heavy-ball coefficient; adam: beta1")
    users_per_client: int = Field(1, ge=1, description=">1: scale mode, a Flower client trains a list of users"
                                  " and returns the sum")
    # Vectorised users (fedsim/training/vectorised.py): per-user gradient sums through layer hooks;
    # the clipped sum equals the back-to-back path to float tolerance.
    vectorise: bool = Field(False, description="a worker trains `vector_users` users in one forward/backward"
                            " over their stacked batches; needs client_optimizer sgd; users whose local plan is not"
                            " exactly one batch are trained back to back (logged, counted)")
    vector_users: int = Field(32, ge=1, description="users per grouped pass (memory ~ vector_users x trainable"
                              " weights x 3 floats)")


class ElsConfig(_Strict):
    """ELS: centralized DP-SGD with example-level Poisson sampling and a user-level accountant."""

    k: int = Field(16, ge=1, description="examples kept per user (seeded choice); the group size of the"
                   " user-level accountant")
    expected_batch: float = Field(64.0, gt=0, description="q * (capped examples): expected examples per step;"
                                  " the public denominator")
    # set q directly and the number of kept examples need not be public
    sampling_rate: float | None = Field(None, gt=0, le=1, description="q set directly: each kept example joins a"
                                        " step with this probability; the noisy sum is still divided by"
                                        " expected_batch (a public constant)")
    steps: int | None = Field(None, ge=1, description="planned steps; None: match ULS's planned compute (see"
                              " compare.budget)")
    clip_norm: float | None = Field(None, gt=0, description="per-example gradient L2 clip C (None: dp.clip_norm);"
                                    " with adaptive clipping its start C_0 (None: dp.adaptive_clip.initial_clip)")
    adaptive_clip: bool = Field(True, description="with dp.adaptive_clip set: ELS adapts its per-example clip too"
                                " (a noised count of examples); false: a fixed clip (els.clip_norm)")
    optimizer: Literal["sgd", "momentum", "adam"] = Field("sgd", description="the server-optimizer family ULS"
                                                          " uses, on the noisy mean gradient")
    lr: float = Field(0.5, gt=0, description="learning rate on the noisy mean gradient")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum: heavy-ball coefficient; adam: beta1")
    per_example: Literal["auto", "hooks", "vmap", "opacus"] = Field("auto", description="per-example gradients"
                                                                    " (auto: hooks, else vmap)")
    micro_batch: int = Field(256, ge=1, description="examples per forward pass (a Poisson batch can exceed its"
                             " expectation)")
    eval_every: int = Field(50, ge=1, description="steps between evaluations (and at the end)")
    accounting_interval: float = Field(1e-2, gt=0, le=0.1, description="PLD discretisation of the mixture"
                                       " (coarser: faster, looser, still an upper bound)")


class CompareConfig(_Strict):
    """`fedsim compare`: ULS vs ELS at the same (epsilon, delta) and compute budget."""

    budget: int | None = Field(None, ge=1, description="example-gradient evaluations per method; None: ULS's"
                               " planned compute (run.rounds)")
    name: str = Field("compare", description="comparison directory <run.output_dir>/<name>")
    methods: list[Literal["uls", "els", "non-private"]] = Field(
        ["uls", "els", "non-private"], min_length=1,
        description="the rows of the comparison; non-private: the reference (same compute, no noise)")
    reference: Literal["uls", "els"] = Field(
        "uls", description="the non-private reference's shape: ULS's rounds and cohorts, or ELS's steps and batches")
    # learning rates tuned for clipped updates can diverge without the clipping (measured on the default)
    reference_clip: bool = Field(True, description="the reference keeps the method's clipping (the cost of the noise"
                                 " alone, epsilon = inf); false: no clipping either")


class MeanEstimationConfig(_Strict):
    """The synthetic mean-estimation study (fedsim/models/mean_estimation.py, bench/mean_estimation_sweep.py)."""

    dim: int = Field(32, ge=1, description="d, the dimension of the estimated mean")
    examples_per_user: int = Field(16, ge=1, description="m (every user); ELS keeps k <= m of them")
    heterogeneities: list[float] = Field([0.0, 0.9], description="h: share of an example's variance that is"
                                         " between users (swept)")
    seeds: int = Field(3, ge=1, description="replicas averaged per setting")
    epsilons: list[float] = Field([1.0, 4.0, 16.0], description="user-level budgets (swept)")
    budgets: list[int] = Field([4000, 32000, 256000], description="per-example gradient evaluations per method"
                               " (swept)")
    uls_cohorts: list[float] = Field([50.0, 100.0, 200.0, 400.0], description="ULS expected cohorts tried (best"
                                     " kept)")
    uls_examples_per_user: list[int] = Field([1, 4, 16], description="ULS examples a sampled user trains on,"
                                             " tried (best kept)")
    uls_local_epochs: int = Field(1, ge=1, description="full-batch local GD epochs (local lr 1: one epoch gives"
                                  " the user mean)")
    els_k: list[int] = Field([1, 4, 16], description="ELS examples per user tried (best kept)")
    els_batches: list[float] = Field([100.0, 400.0], description="ELS expected batches tried (best kept)")
    lrs: list[float] = Field([0.1, 0.3, 1.0, 3.0], description="ULS server / ELS learning rates tried (best kept)")
    clip_norms: list[float] = Field([0.25, 0.5, 1.0], description="clip norms tried, for both methods (best kept)")
    accounting_interval: float = Field(2e-2, gt=0, le=0.1, description="PLD discretisation for the ELS mixture"
                                       " calibrations")


class AdaptiveClipConfig(_Strict):
    """Adaptive clipping (Andrew et al. 2021): the clip norm tracks a quantile of the update norms."""

    target_quantile: float = Field(0.5, gt=0, lt=1, description="gamma: the share of updates the clip norm"
                                   " should leave unclipped (0.5: the median norm)")
    learning_rate: float = Field(0.2, gt=0, description="eta: the geometric step C <- C exp(-eta (b - gamma)), b"
                                 " the noisy unclipped share (0.2: the paper's)")
    count_noise_multiplier: float | None = Field(None, gt=0, description="the count's noise std over its"
                                                 " sensitivity 1/2 (centered bits): 2 sigma_b; Flower's"
                                                 " clipped_count_stddev is half of it (None: the paper's sigma_b ="
                                                 " expected cohort (ELS: batch) / 20); must exceed the combined"
                                                 " noise multiplier")
    initial_clip: float | None = Field(None, gt=0, description="C_0, a public guess (None: dp.clip_norm; ELS:"
                                       " els.clip_norm if set)")


class BandedMfConfig(_Strict):
    """Banded matrix-factorization noise (dp.mechanism: banded_mf), with cyclic Poisson user sampling."""

    bands: int = Field(4, ge=1, description="b: nonzero bands of the strategy C, and user groups (user id mod b;"
                       " round t samples group (t - 1) mod b at rate b x q); 1: DP-FedAvg exactly; at most the rounds")
    strategy: Literal["sqrt", "optimized"] = Field("sqrt", description="sqrt: banded square root of the prefix-sum"
                                                   " matrix; optimized: banded Toeplitz C minimising the prefix-sum"
                                                   " error for the planned rounds")


class DpConfig(_Strict):
    """User-level differential privacy: budget, clipping, noise, accounting."""

    epsilon: float | None = Field(8.0, gt=0, description="target user-level epsilon for the planned rounds"
                                  " (None: non-private)")
    delta: float | None = Field(None, gt=0, lt=1, description="target delta (None: min(1e-5, 1 / N^1.1) for N"
                                " users)")
    clip_norm: float = Field(1.0, gt=0, description="per-user L2 clipping norm C of the model delta")
    adaptive_clip: AdaptiveClipConfig | None = Field(None, description="None: a fixed clip norm; else the clip"
                                                     " follows a quantile of the update norms through a noised count of unclipped updates"
                                                     " (fedsim/privacy/adaptive_clipping.py; gaussian noise only)")
    noise_multiplier: float | None = Field(None, ge=0, description="noise std / C; set to skip calibration (0: no"
                                           " noise, epsilon = inf); with adaptive_clip the combined multiplier of"
                                           " update and count (the update's own noise is larger)")
    accountant: Literal["pld", "rdp", "prv", "edgeworth", "lmo_faithful"] = Field(
        "pld", description="the accountant that reports epsilon")
    mechanism: Literal["gaussian", "lmo", "banded_mf"] = Field("gaussian", description="the noise added to the"
                                                                " clipped sum (banded_mf: ULS only, correlated"
                                                                " across rounds)")
    lmo: dict[str, Any] | None = Field(None, description="lmo: parameters, or {\"search\":"
                                       " path-to-search-result.json} (None: searched for dp.epsilon)")
    banded_mf: BandedMfConfig | None = Field(None, description="banded_mf: {bands: b, integer >= 1, at most the"
                                             " rounds (default 4; 1 = DP-FedAvg), strategy: sqrt (default) or"
                                             " optimized}; users are split into b groups (id mod b), round t samples"
                                             " group (t - 1) mod b at rate b x q (null: the defaults); only with"
                                             " dp.mechanism banded_mf")
    # true: anyone with config.yaml can regenerate every secret draw (fedsim/privacy/randomness.py)
    reproducible: bool = Field(False, description="true: cohorts, ELS samples and noise are derived from run.seed,"
                               " so the reported epsilon does not hold (tests and debugging only); false: a fresh"
                               " 256-bit OS-entropy key per process")


class FaultConfig(_Strict):
    """Fault injection for tests and demos: each Flower message fails with these rates."""

    raise_rate: float = Field(0.0, ge=0, le=1, description="the client raises (Flower error reply)")
    nan_rate: float = Field(0.0, ge=0, le=1, description="the client returns a NaN delta sum")
    shape_rate: float = Field(0.0, ge=0, le=1, description="the client returns a wrongly shaped array")
    kill_rate: float = Field(0.0, ge=0, le=1, description="the worker process dies (only inside a Ray actor)")
    hang_rate: float = Field(0.0, ge=0, le=1, description="the client sleeps `hang_seconds` before replying (a"
                             " timeout)")
    hang_seconds: float = Field(5.0, gt=0, description="how long a hanging client sleeps; longer than"
                                " simulation.timeout makes the reply miss its round")
    server_crash_round: int | None = Field(None, ge=1, description="the server SIGKILLs itself right after"
                                           " recording this round's release")
    seed: int = Field(0, description="seed of the fault draws")

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
    """How the Flower simulation runs."""

    backend: Literal["ray", "inprocess"] = Field("ray", description="ray: Flower's simulation engine; inprocess:"
                                                 " the same strategy, messages and workers in this process, no"
                                                 " Ray (one worker: least memory)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per Flower client (actor)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor, fractional allowed (0.25 = four actors per"
                            " GPU)")
    num_workers: int | None = Field(None, ge=1, description="scale mode: number of Flower nodes (default: one per"
                                    " CPU)")
    ray_address: str | None = Field(None, description="join an existing Ray cluster: \"HEAD_IP:6379\" (the GCS"
                                    " address `ray start --head` prints) or \"auto\"")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for a round's replies")
    verbose: bool = Field(False, description="Flower / Ray logs on the console")
    faults: FaultConfig = Field(FaultConfig(), description=FaultConfig.__doc__)


class RunConfig(_Strict):
    """The run: its directory, length, seed, evaluation and outputs."""

    name: str = Field("run", description="the run directory's name")
    output_dir: str = Field("runs", description="a run directory <output_dir>/<name> is created (never"
                            " overwritten)")
    rounds: int = Field(30, ge=1, description="planned rounds (ULS); the budget is calibrated for these")
    seed: int = Field(0, description="public randomness: model init, data split, ELS example cap, local batch"
                      " order, dropout")
    eval_every: int = Field(5, ge=1, description="rounds between evaluations (and at the end)")
    eval_examples: int = Field(512, ge=1, description="held-out examples used for evaluation (a subset fixed by"
                               " data.seed)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="torch device of the models (auto: CUDA"
                                                   " where the process has it)")
    # on by default: a checkpoint costs ~0.1% of a default ULS round (bench/checkpoint_overhead.py)
    checkpoint_every: int = Field(1, ge=0, description="write an atomic checkpoint every N rounds/steps (0: never);"
                                  " `fedsim run --resume DIR` continues from the last one")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per process (None: 1, best for"
                                " small per-user batches)")
    tensorboard: bool = Field(False, description="also write each round's numeric fields as TensorBoard scalars"
                              " to <run_dir>/tensorboard/ (needs `pip install fedsim[tensorboard]`)")


class SweepConfig(_Strict):
    """`fedsim sweep CONFIG`: the grid it runs when no --grid is given (configs/paper_grid.yaml)."""

    grid: dict[str, list] = Field({}, description="config key -> values; every combination is one cell,"
                                  " e.g. {dp.epsilon: [1, 4], compare.budget: [2000, 8000]}")
    seeds: int = Field(1, ge=1, description="seeds per cell (run.seed + 0, 1, ...)")
    jobs: int | None = Field(None, ge=1, description="comparisons run at once, one process each (None: one with"
                             " the Ray backend, else one per core)")


class AuditConfig(_Strict):
    """`fedsim audit`: canary users inserted into the population to measure the privacy a run really has."""

    canaries: int = Field(0, ge=0, description="canary users (`fedsim audit --canaries`; 0 here: `fedsim audit`"
                          " uses 1000); each is in the population by a secret fair coin. Only `fedsim audit` inserts"
                          " them: `fedsim run` refuses a config with canaries")
    kind: Literal["gradient", "text"] = Field("gradient", description="gradient: a canary's update (ULS) or every"
                                              " per-example gradient (ELS) is a fixed random direction; text: a"
                                              " canary user holds a secret random sequence and trains on it")
    canary_norm: float = Field(10.0, ge=1, description="a gradient canary's raw norm, in multiples of the clip norm"
                               " C: clipping brings it to C, so a raw norm above C also tests the clipping")
    seed: int = Field(0, description="public seed of the canaries' directions and sequences (the auditor knows"
                      " them; only the inclusion coins are secret)")
    references: int = Field(2000, ge=1, description="text canaries: random reference sequences the canaries'"
                            " exposure is ranked against")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the one-run lower bound")


class ExperimentConfig(_Strict):
    run: RunConfig = Field(RunConfig(), description=RunConfig.__doc__)
    data: DataConfig = Field(DataConfig(), description=DataConfig.__doc__)
    model: ModelConfig = Field(ModelConfig(), description=ModelConfig.__doc__)
    uls: UlsConfig = Field(UlsConfig(), description=UlsConfig.__doc__)
    dp: DpConfig = Field(DpConfig(), description=DpConfig.__doc__)
    simulation: SimulationConfig = Field(SimulationConfig(), description=SimulationConfig.__doc__)
    els: ElsConfig = Field(ElsConfig(), description=ElsConfig.__doc__)
    compare: CompareConfig = Field(CompareConfig(), description=CompareConfig.__doc__)
    mean_estimation: MeanEstimationConfig = Field(MeanEstimationConfig(), description=MeanEstimationConfig.__doc__)
    sweep: SweepConfig = Field(SweepConfig(), description=SweepConfig.__doc__)
    audit: AuditConfig = Field(AuditConfig(), description=AuditConfig.__doc__)

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.model.source == "local" and not self.model.path:
            raise ValueError("model.path is required when model.source is 'local'")
        if self.data.source == "files" and not self.data.path:
            raise ValueError("data.path is required when data.source is 'files'")
        if self.data.public_path and self.data.source != "files":
            raise ValueError(f"data.public_path is for data.source 'files' (data.source is {self.data.source!r})")
        if self.model.arch.n_embd % self.model.arch.n_head:
            raise ValueError("model.arch.n_embd must be divisible by model.arch.n_head")
        if self.dp.adaptive_clip is not None and self.dp.mechanism != "gaussian":
            raise ValueError(f"dp.adaptive_clip needs dp.mechanism gaussian (got {self.dp.mechanism!r}): its noise"
                             " split and accounting are for Gaussian noise; set dp.adaptive_clip=null to clip at"
                             f" a fixed dp.clip_norm ({self.dp.clip_norm:g}) with {self.dp.mechanism}")
        if self.dp.banded_mf is not None and self.dp.mechanism != "banded_mf":
            raise ValueError(f"dp.banded_mf is set but dp.mechanism is {self.dp.mechanism!r}: banded MF noise is"
                             " its own mechanism (dp.mechanism: banded_mf) and cannot be combined with another")
        if self.dp.lmo is not None and self.dp.mechanism == "banded_mf":
            raise ValueError("dp.lmo is set but dp.mechanism is 'banded_mf': LMO noise cannot be combined with"
                             " banded MF (drop dp.lmo)")
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


def path_keys(model: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path-valued keys (fields marked `PATH`), e.g. ("data", "path")."""
    out = []
    for name, field in (model or ExperimentConfig).model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += path_keys(ann, (*prefix, name))
        elif field.json_schema_extra == PATH:
            out.append((*prefix, name))
    return out


def _absolute(value: str, base: Path) -> str:
    if not value or value.startswith("package:"):  # a directory shipped by an installed package
        return value
    p = Path(value).expanduser()
    return str(p) if p.is_absolute() else os.path.normpath(base.absolute() / p)


def resolve_paths(raw: dict, base: str | Path) -> dict:
    """Make every relative path of `raw` (a config's sections, as read from YAML) absolute against `base`: the
    path-valued keys (`path_keys()`: data.path, data.public_path, model.path) and dp.lmo's {"search": file}.
    Absolute paths (after `~` expansion), `package:NAME` and null are kept. Changes `raw` in place; returns it.
    (run.output_dir is not a path to an input: it stays relative to the working directory.)"""
    base = Path(base)
    for key in path_keys():
        node = raw
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key[-1]), str):
            node[key[-1]] = _absolute(node[key[-1]], base)
    dp = raw.get("dp")
    lmo = dp.get("lmo") if isinstance(dp, dict) else None
    if isinstance(lmo, dict) and isinstance(lmo.get("search"), str):
        lmo["search"] = _absolute(lmo["search"], base)
    return raw


def read_config_file(path: str | Path) -> dict:
    """A config file's sections, unvalidated, with its relative paths made absolute against the file's own
    directory (a config and its data travel together)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
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
    return resolve_paths(raw, p.parent)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The validated config of a YAML file (None: the defaults) with `--set` overrides. Relative paths in the
    file are resolved against the file's directory, relative paths given in `overrides` against the working
    directory (as typed on a command line): every path of the result is absolute (config.yaml records it)."""
    raw = read_config_file(path) if path is not None else {}
    return config_from_dict(raw, overrides or [], str(path) if path is not None else "(defaults)")


def config_from_dict(raw: dict, overrides=(), source: str = "(dict)") -> ExperimentConfig:
    """The validated config of `raw` (sections as read from YAML; not changed) with `--set` overrides;
    relative paths still in it resolve against the working directory. A bad key or value is a
    ConfigError naming it and `source`."""
    import copy

    raw = resolve_paths(apply_overrides(copy.deepcopy(raw), list(overrides)), Path.cwd())
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def config_from_json(text: str) -> ExperimentConfig:
    return ExperimentConfig.model_validate(json.loads(text))
