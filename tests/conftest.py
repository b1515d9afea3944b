import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tests never touch the user's cache; the tiny models they build are cheap
os.environ.setdefault("FEDSIM_CACHE_DIR", str(ROOT / ".cache" / "test-cache"))


@pytest.fixture
def smoke_cfg(tmp_path):
    from fedsim.config import load_config

    return load_config(ROOT / "configs" / "smoke.yaml", [f"run.output_dir={tmp_path}"])
