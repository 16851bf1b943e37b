#!/usr/bin/env bash
# Each recipe for as long as fits in 15 minutes, then its test precision over all test
# images (issue 3's measurement; results: docs/RESULTS.md, "Every recipe in 15 minutes").
# Training stops by SIGTERM at 900 s, which finishes the step and writes a checkpoint;
# `--mode=eval` then evaluates that checkpoint. Run from the project root, one recipe at
# a time on an otherwise idle machine.
# Usage: bash benchmarks/recipes_15min.sh [python] [recipe ...]   (default: B to F)
set -u
PY=${1:-.venv/bin/python}
shift || true
RECIPES=${*:-cifar_cookbook cifar_tutorial mnist_cnn cifar_deep cifar_vgg16}
export TFDS_DATA_DIR=${TFDS_DATA_DIR:-../shared/tensorflow_datasets}
for recipe in $RECIPES; do
  workdir=runs/${recipe}_15m
  echo "=== $recipe $(date -u +%H:%M:%S)"
  timeout -s TERM 900 $PY run.py --config configs/$recipe.py --workdir $workdir \
      --config.eval_every=0 --config.progress=lines | grep -E '^(step [0-9]+,|stopped|error)' | tail -3
  $PY run.py --mode=eval --workdir $workdir | grep -E 'precision|error'
done
