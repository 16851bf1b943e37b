#!/usr/bin/env bash
# Issue 12's GPU measurements in one command, on a machine with one NVIDIA GPU and cnnjax
# installed with its CUDA extra (`pip install -e '.[cuda]'`, or '.[cuda13]') and CIFAR-10
# where TFDS finds it (TFDS_DATA_DIR, or downloaded by TFDS):
#
#     bash benchmarks/gpu_end_to_end.sh [python] 2>&1 | tee gpu_end_to_end.log
#
# 1. Recipe A end to end on the real data (benchmarks/end_to_end.py: the real loop, feed
#    and dispatch groups), batch 128 and 1024, 1 and 10 steps per dispatch, host batches
#    and data on the device, beside bench mode's synthetic figure (real / synthetic).
# 2. Recipe A's train step in PyTorch on the same GPU (benchmarks/torch_recipe_a.py:
#    eager, torch.compile, and compile with CUDA graphs), batch 128 and 1024, against
#    cnnjax's bench-mode step (10 steps per dispatch).
# 3. The main job's wall time: configs/cifar_lrn.py, 3,000 steps with its 3 evaluations
#    and 6 checkpoints, from a fresh workdir (compilation included), then the steps' own
#    time from metrics.jsonl.
# 4. Every recipe's full schedule, where SCHEDULES=1 (hours on one GPU: E and F most).
# Results go to docs/RESULTS.md by hand, with the printed versions and device.
set -u
PY=${1:-python}
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=2
work=${WORK:-$(mktemp -d)}
$PY - <<'EOF'
import jax, flax, optax
print(f'jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__};',
      f'{jax.device_count()} x {jax.devices()[0].device_kind}')
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# The real-data parts need TensorFlow and TFDS (tf.data reads the TFRecords); where they are
# missing (the lent GPU machines' image) those parts say so and the rest still runs.
if $PY -c 'import tensorflow, tensorflow_datasets' 2>/dev/null; then real=1; else
  real=0; echo "(no tensorflow/tensorflow_datasets: parts 1, 3 and 4 skipped)"; fi

echo "=== 1. real data vs synthetic, Recipe A"
[ $real = 1 ] && for batch in 128 1024; do
  $PY benchmarks/end_to_end.py --batch $batch --steps_per_dispatch 1,10 \
      --data_on_device false,true --steps 1200 --rounds 3 2>&1 | grep -E '^\||^jax'
done

echo "=== 2. PyTorch beside cnnjax, Recipe A's train step"
for batch in 128 1024; do
  $PY benchmarks/torch_recipe_a.py --batch $batch --steps 500 2>&1 | grep -E '^torch'
  $PY run.py --mode=bench --config configs/cifar_lrn.py --config.bench.batch_size=$batch \
      --config.bench.steps=500 2>&1 | grep -E '^bench:|Forward-backward across'
done

echo "=== 3. the main job, Recipe A 3,000 steps"
[ $real = 1 ] && /usr/bin/time -f 'main job wall %e s' $PY run.py --config configs/cifar_lrn.py \
    --workdir "$work/main_job" --config.progress=lines 2>&1 | grep -E 'precision|wall|^input'
[ $real = 1 ] && $PY - "$work/main_job/metrics.jsonl" <<'EOF'
import json, sys
train = [r for r in map(json.loads, open(sys.argv[1])) if r['kind'] == 'train']
steady = sorted(r['sec_per_batch'] for r in train[1:])
print(f'train steps: median {steady[len(steady) // 2] * 1e3:.3f} ms/step, '
      f'{3000 * steady[len(steady) // 2]:.2f} s for 3,000 steps at that rate')
EOF

if [ "${SCHEDULES:-0}" = 1 ] && [ $real = 1 ]; then
  echo "=== 4. every recipe's full schedule"
  for recipe in cifar_cookbook cifar_tutorial mnist_cnn cifar_deep cifar_vgg16; do
    /usr/bin/time -f "$recipe wall %e s" $PY run.py --config configs/$recipe.py \
        --workdir "$work/$recipe" --config.progress=lines 2>&1 | grep -E 'precision|wall'
  done
fi
