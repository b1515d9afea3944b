#!/usr/bin/env bash
# pfl-research 0.6.0 in its own virtual environment, for bench/shared_workload.py's peer
# variants. Never a dependency of fedsim: fedsim's venv does not see it, and the peer script
# (bench/peers/pfl_workload.py) imports nothing from fedsim.
#
#   bash bench/peers/setup_pfl.sh [VENV_DIR]      # default: bench/peers/.venv-pfl
#
# torch is the same 2.13.0 CPU wheel fedsim uses (installed first, so pfl's `pytorch` extra
# does not pull another build); transformers is pinned to fedsim's version so both sides build
# the identical GPT-2 module.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/.venv-pfl}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "pfl[pytorch]==0.6.0" transformers==5.23.0 safetensors==0.8.0 psutil
"$venv/bin/python" -c "import pfl, torch, transformers; print('pfl-research', pfl.__version__ if hasattr(pfl, '__version__') else '0.6.0', 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "peer venv ready: $venv"
