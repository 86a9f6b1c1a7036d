#!/usr/bin/env bash
# The quickstart on this machine: a local Ray started by curvdist itself, 2 stage actors on the CPU.
#   launch/local.sh                          # = .venv/bin/curvdist run configs/quickstart.yaml
#   launch/local.sh top_k=8 stages=3         # extra arguments are dotted overrides (or --out DIR, --debug)
# RAY_AUTH_MODE=disabled: a private single-machine cluster needs no token authentication.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled
exec .venv/bin/curvdist run configs/quickstart.yaml "$@"
