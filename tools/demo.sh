#!/usr/bin/env bash
# The demo (README): on a fresh machine, builds the package into .venv/cpu (CPU torch 2.13.0)
# and trains a small byte-level language model with torch.optim.Adagrad and our 32-bit and
# 8-bit Adagrads; arguments go to the demo (--help lists them), results land in out/demo.
#
#   bash tools/demo.sh
#   bash tools/demo.sh --steps 1000 --d-model 256 --out out/demo-big
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash tools/setup-env.sh .venv/cpu "torch==2.13.0"
# -P: from the repo root the source tree would shadow the installed package (the compiled library)
exec .venv/cpu/bin/python -P -m torch_adagrad8.demo "$@"
