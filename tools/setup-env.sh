#!/usr/bin/env bash
# Create (or reuse) a virtual environment with a given torch, the build and test tools, and
# this package built against that torch.
#
#   bash tools/setup-env.sh .venv/cpu  torch==2.13.0                  # CPU build
#   ADAGRAD8_CUDA=ON bash tools/setup-env.sh .venv/cuda torch==2.14.1  # CUDA build (nvcc needed)
set -euo pipefail
venv=${1:?usage: setup-env.sh VENV_DIR TORCH_REQUIREMENT}
torch_req=${2:?usage: setup-env.sh VENV_DIR TORCH_REQUIREMENT}
root=$(cd "$(dirname "$0")/.." && pwd)

quiet_pip() {  # pip, minus this machine's harmless "Location ... is ignored" index warnings
  "$venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
start=$SECONDS
quiet_pip install -q "$torch_req" numpy scikit-build-core pybind11 "cmake>=3.25" ninja \
  pytest expecttest hypothesis tqdm matplotlib scikit-learn bitsandbytes==0.50.2
echo "[setup-env] $venv: dependencies ready in $((SECONDS - start)) s"
start=$SECONDS
quiet_pip install -q --no-build-isolation --force-reinstall --no-deps "$root"
echo "[setup-env] $venv: torch_adagrad8 built and installed in $((SECONDS - start)) s" \
  "(ADAGRAD8_CUDA=${ADAGRAD8_CUDA:-AUTO})"
