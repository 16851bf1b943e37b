#!/usr/bin/env bash
# One recipe trained by cnnjax and by its TF reference (benchmarks/tf_reference.py) for
# the same number of steps, one after the other, each timed by /usr/bin/time (issue 11;
# results: docs/RESULTS.md, "Every recipe beside its TensorFlow reference").
# cnnjax checkpoints into runs/<recipe>_<steps>_s<seed>, the TF reference into
# runs/<recipe>_<steps>_s<seed>_tf: re-running resumes either, so a long run can be
# stopped with SIGTERM and continued by running the same command again.
# Logs: runs/logs/<recipe>_<steps>_s<seed>.{cnnjax,tf}.log
# ISA=avx2 caps both sides' instruction set (--isa, cnnjax/cpu.py): runs/<...>_avx2.
# Usage: [ISA=avx2] bash benchmarks/beside_tf.sh RECIPE STEPS [SEED] [cnnjax|tf|both]
set -eu
recipe=$1 steps=$2 seed=${3:-0} which=${4:-both}
PY=${PY:-.venv/bin/python}
ISA=${ISA:-native}
export TFDS_DATA_DIR=${TFDS_DATA_DIR:-../shared/tensorflow_datasets}
name=${recipe}_${steps}_s${seed}$([ "$ISA" = native ] || echo "_$ISA")
mkdir -p runs/logs
if [ "$which" != tf ]; then
  /usr/bin/time -f 'wall %e s' $PY run.py --config configs/$recipe.py --workdir runs/$name \
      --config.num_train_steps=$steps --config.seed=$seed --config.progress=lines --isa $ISA \
      >> runs/logs/$name.cnnjax.log 2>&1
fi
if [ "$which" != cnnjax ]; then
  /usr/bin/time -f 'wall %e s' $PY benchmarks/tf_reference.py --config configs/$recipe.py \
      --steps $steps --seed $seed --checkpoint_dir runs/${name}_tf --isa $ISA \
      >> runs/logs/$name.tf.log 2>&1
fi
