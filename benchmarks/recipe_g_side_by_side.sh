#!/usr/bin/env bash
# Recipe G (airbench94) on the CPU, cnnjax and the PyTorch reference one after the other,
# seed by seed, on the otherwise idle machine (issue 23; docs/RESULTS.md "Recipe G"):
#
#   bash benchmarks/recipe_g_side_by_side.sh [SEEDS] [SIDES]     # default: "0 1 2" "cnnjax torch"
#
# Logs go to runs/recipe_g/<side>_<seed>.log, cnnjax's workdirs to runs/recipe_g/cnnjax_<seed>.
# Start it under nohup; SIGTERM stops the current run (cnnjax checkpoints every epoch and
# resumes from its workdir when started again; a finished seed's log is kept and skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"0 1 2"}
SIDES=${2:-"cnnjax torch"}
PY=${PYTHON:-.venv/bin/python}
OUT=runs/recipe_g
mkdir -p "$OUT"
export TFDS_DATA_DIR=${TFDS_DATA_DIR:-../shared/tensorflow_datasets}
trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 143' TERM INT
for seed in $SEEDS; do
  for side in $SIDES; do
    log="$OUT/${side}_${seed}.log"
    if grep -qs '^DONE' "$log"; then continue; fi
    start=$(date +%s)
    echo "$(date -u +%FT%TZ) start $side seed $seed ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))" >> "$log"
    if [ "$side" = cnnjax ]; then
      "$PY" run.py --config configs/cifar_fast.py --workdir "$OUT/cnnjax_$seed" \
        --config.seed="$seed" --config.progress=lines >> "$log" 2>&1 &
    else
      "$PY" benchmarks/torch_recipe_g.py --seeds "$seed" >> "$log" 2>&1 &
    fi
    child=$!
    wait "$child"
    echo "DONE $side seed $seed: $(( $(date +%s) - start )) s wall (this start)" >> "$log"
  done
done
