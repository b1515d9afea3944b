"""pfl-research 0.6.0 on the shared workload: the peer that `bench/shared_workload.py` runs
beside fedsim (variants `pfl`, `pfl_2threads`, `pfl_2proc`).

Runs in pfl-research's own virtual environment (`bench/peers/setup_pfl.sh`), never in
fedsim's, and imports nothing from fedsim: the parent script exports the workload once
(`--workload DIR`: the users' encoded sequences, the model's initial weights and its GPT-2
config, all written by fedsim's own data and model code), so both sides train the same model
from the same initial weights on the same users' examples.

What runs is pfl-research's documented PyTorch recipe (its `benchmarks/lm/pytorch/train.py`):
`PyTorchModel` (local SGD, central SGD), `FederatedAveraging`, `SimulatedBackend` with the
central `GaussianMechanism` wrapped in `CentrallyAppliedPrivacyMechanism` (per-user L2
clipping to C, Gaussian noise of std sigma C on the sum), `NNTrainHyperParams` with one local
step of batch 8. pfl samples a fixed cohort (100 users per round, uniformly at random);
fedsim draws Poisson cohorts of expected size 100: users/s normalises the difference.

    bench/peers/.venv-pfl/bin/python bench/peers/pfl_workload.py --workload DIR --out res.json [--threads 2]
    torchrun --nproc_per_node 2 bench/peers/pfl_workload.py ...      # two worker processes (gloo)

Writes JSON: per-round wall times (`round_times`, stamped by a pfl callback after every
central iteration) and cohort sizes. Peak memory is measured by the parent over the process
tree, as for every other variant.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, help="directory written by shared_workload.export_workload")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    wl = Path(args.workload)
    spec = json.loads((wl / "workload.json").read_text())
    users = np.load(wl / "users.npz")
    ids, mask = torch.from_numpy(users["input_ids"]), torch.from_numpy(users["attention_mask"])
    labels = ids.masked_fill(mask == 0, -100)

    class LM(GPT2LMHeadModel):
        """pfl's PyTorch models need `loss(*batch)` and `metrics(*batch)`."""

        def loss(self, input_ids, attention_mask, labels):
            return self(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

        @torch.no_grad()
        def metrics(self, input_ids, attention_mask, labels):
            loss = self.loss(input_ids, attention_mask, labels)
            n = int((labels != -100).sum())
            return {"loss": Weighted(float(loss) * n, n)}

    model = LM(GPT2Config(**spec["gpt2_config"]))
    model.load_state_dict(load_file(wl / "init.safetensors"))
    model.train()

    def make_dataset(user: int) -> Dataset:
        return Dataset(raw_data=[ids[user], mask[user], labels[user]], user_id=str(user))

    np.random.seed(0)
    torch.manual_seed(0)
    user_ids = list(range(ids.shape[0]))
    train_data = FederatedDataset(make_dataset, get_user_sampler("random", user_ids))
    val_data = FederatedDataset(make_dataset, get_user_sampler("random", user_ids))
    central_privacy = CentrallyAppliedPrivacyMechanism(
        GaussianMechanism(clipping_bound=spec["clip"], relative_noise_stddev=spec["noise_multiplier"]))
    backend = SimulatedBackend(training_data=train_data, val_data=val_data, postprocessors=[central_privacy])
    pfl_model = PyTorchModel(model=model, local_optimizer_create=torch.optim.SGD,
                             central_optimizer=torch.optim.SGD(model.parameters(), lr=spec["server_lr"]))

    stamps = [time.perf_counter()]

    class Stamp(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stamps.append(time.perf_counter())
            return False, Metrics()

    rounds, cohort = spec["rounds"], int(spec["expected_cohort"])
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=10**6,
                                           train_cohort_size=cohort, val_cohort_size=None),
        backend=backend, model=pfl_model,
        model_train_params=NNTrainHyperParams(local_learning_rate=spec["client_lr"], local_num_epochs=None,
                                              local_num_steps=1, local_batch_size=spec["batch_size"]),
        model_eval_params=NNEvalHyperParams(local_batch_size=spec["batch_size"]),
        callbacks=[Stamp()])
    if int(os.environ.get("RANK", "0")) == 0:
        times = [b - a for a, b in itertools.pairwise(stamps)]
        Path(args.out).write_text(json.dumps({"round_times": times, "cohorts": [cohort] * len(times),
                                              "threads": args.threads,
                                              "processes": int(os.environ.get("WORLD_SIZE", "1"))}))


if __name__ == "__main__":
    main()
