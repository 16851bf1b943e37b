#!/usr/bin/env bash
# Times every recipe's model with `run.py --mode=bench` (synthetic input; no dataset
# needed), forward and forward-backward-update, as seed 004's time_tensorflow_run.
# Usage: bash benchmarks/bench_all.sh [python]   (results: docs/RESULTS.md)
set -u
PY=${1:-python3}
run() {
  echo "=== $*"
  $PY run.py --mode=bench "$@" 2>&1 | grep -E '^bench:|across|^error'
}
run --config configs/cifar_lrn.py
run --config configs/cifar_lrn.py --config.bench.batch_size=1024
run --config configs/cifar_cookbook.py
run --config configs/cifar_tutorial.py
run --config configs/mnist_cnn.py
run --config configs/cifar_deep.py
run --config configs/cifar_vgg16.py
run --config configs/imagenet_vgg16.py --config.bench.steps=100
