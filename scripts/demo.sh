#!/usr/bin/env bash
# The main job: set up everything if needed, then distill spiking students on the bundled digits
# data with CE, CE + KL and CE + HTA-KL and compare them. Extra arguments go to the demo
# (e.g. --quick, --epochs 5, --arch resnet20 --dataset cifar10 --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python -m htakl_kernels.demo "$@"
