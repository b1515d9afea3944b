"""TensorBoard scalars of a run (`run.tensorboard: true`), in <run_dir>/tensorboard/.

Every per-round row the training loop writes becomes one scalar per numeric field at global
step = its round (ULS) or step (ELS), tagged by what the DP guarantee covers, as
`fedsim/rundir.py:split_row` splits it: `released/<field>` (metrics.jsonl) or
`diagnostics/<field>` (diagnostics.jsonl: simulation only, outside the guarantee, never to be
published). Each process writes its own events file, purging (TensorBoard's purge_step) the
steps from its first row on: a resume after a crash re-does the rounds after its checkpoint,
and they show once, as in metrics.jsonl, not twice.
"""

from __future__ import annotations

from pathlib import Path

from fedsim.errors import ConfigError
from fedsim.rundir import split_row

SUBDIR = "tensorboard"


def check_tensorboard() -> None:
    """A one-line ConfigError when `run.tensorboard: true` cannot be honoured."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
    except ImportError:
        raise ConfigError("run.tensorboard is true but the tensorboard package is not installed:"
                          " pip install 'fedsim[tensorboard]' (or set run.tensorboard=false)") from None


class TensorBoardScalars:
    def __init__(self, run_dir: Path, key: str):
        """`key`: the rows' step field ("round" or "step")."""
        self.dir, self.key, self.writer = Path(run_dir) / SUBDIR, key, None

    def add(self, row: dict) -> None:
        step = int(row[self.key])
        if self.writer is None:  # opened at the first row, whose step is where this process takes over
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir), purge_step=step)
        released, diagnostic = split_row(row)
        for prefix, part in (("released", released), ("diagnostics", diagnostic)):
            for name, value in part.items():
                if name != self.key and isinstance(value, (int, float)):  # not None (e.g. an empty batch's loss)
                    self.writer.add_scalar(f"{prefix}/{name}", value, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
