"""cnnjax's train step beside TensorFlow's for the same recipe, timed in one process.

    python benchmarks/cpu_vs_tf.py [--recipes A,B,C,D,E,F] [--steps 30] [--rounds 5] [--isa avx2]

For each recipe: cnnjax's real jitted train_step (cnnjax.bench.Synthetic: the
recipe's config, augmentation, loss, weight losses, optimizer, EMA) and the TF
port of the same step (benchmarks/tf_reference.py, graph mode, TensorFlow's
default oneDNN kernels) on the same synthetic uint8 batch. After warm-up the
two alternate: `rounds` times, `steps` steps of one, then `steps` of the other,
each run waited for at its end. Prints per-round times, the median
examples/sec of each and the ratio cnnjax / TF (above 1: cnnjax is faster).
Results and the command: docs/RESULTS.md.
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ['TF_ENABLE_ONEDNN_OPTS'] = '1'  # TF's default on x86 Linux; run.py turns it off
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]

from cnnjax import cpu  # noqa: E402

cpu.cap_isa_from_argv(sys.argv)  # before jax and TensorFlow load oneDNN
import jax  # noqa: E402
import numpy as np  # noqa: E402

import tf_reference  # noqa: E402
from cnnjax import bench, config as config_lib, kernels  # noqa: E402

tf = tf_reference.tf
RECIPES = {'A': 'cifar_lrn', 'B': 'cifar_cookbook', 'C': 'cifar_tutorial', 'D': 'mnist_cnn',
           'E': 'cifar_deep', 'F': 'cifar_vgg16'}
FEW_STEPS = {'E': 3, 'F': 3}  # the deep nets take seconds per step on two cores


def timed(fn, steps):
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn()
  np.asarray(out)  # waits for the last step, and so for all of them
  return (time.perf_counter() - start) / steps


def compare(recipe, steps, rounds, warmup):
  config = config_lib.load_file(ROOT / 'configs' / f'{RECIPES[recipe]}.py')
  ours = bench.Synthetic(config, steps_per_call=1)  # one step per call, as TF's
  images = tf.constant(ours.host_batch['image'])
  labels = tf.constant(ours.host_batch['label'])
  theirs = tf_reference.TrainStep(config, (ours.size, ours.size, ours.channels), ours.classes)
  run_ours = ours.train_once
  run_theirs = lambda: theirs(images, labels)
  for fn in (run_ours, run_theirs):
    timed(fn, warmup)
  times = {'cnnjax': [], 'tensorflow': []}
  for _ in range(rounds):
    times['cnnjax'].append(timed(run_ours, steps))
    times['tensorflow'].append(timed(run_theirs, steps))
  med = {k: statistics.median(v) for k, v in times.items()}
  row = {'recipe': recipe, 'config': RECIPES[recipe], 'batch': ours.batch,
         'cnnjax_ms': med['cnnjax'] * 1e3, 'tf_ms': med['tensorflow'] * 1e3,
         'cnnjax_eps': ours.batch / med['cnnjax'], 'tf_eps': ours.batch / med['tensorflow'],
         'ratio': med['tensorflow'] / med['cnnjax'],
         'rounds_ms': {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()}}
  print(f"{recipe} {row['config']:15s} batch {row['batch']:3d}: cnnjax {row['cnnjax_ms']:7.1f} ms "
        f"({row['cnnjax_eps']:6.0f} ex/s)  TF {row['tf_ms']:7.1f} ms ({row['tf_eps']:6.0f} ex/s)  "
        f"ratio {row['ratio']:.2f}x   rounds {row['rounds_ms']}", flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--recipes', default='A,B,C,D,E,F')
  parser.add_argument('--steps', type=int, default=30, help='steps per timed run (E, F: 3)')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--isa', choices=list(cpu.ISA_CAPS), default='native',
                      help='cap oneDNN and XLA (and TF) at this ISA (cnnjax/cpu.py)')
  args = parser.parse_args()
  print(cpu.describe(), flush=True)
  from tensorflow.python.util import _pywrap_util_port
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, cnnjax CPU kernels: '
        f'{kernels.describe()}; tensorflow {tf.__version__}, oneDNN '
        f'{"on" if _pywrap_util_port.IsMklEnabled() else "off"}; '
        f'{os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  rows = []
  for recipe in args.recipes.split(','):
    steps = min(args.steps, FEW_STEPS.get(recipe, args.steps))
    rows.append(compare(recipe, steps, args.rounds, warmup=max(2, steps // 3)))
  print(f'\ncnnjax CPU kernels: {kernels.describe()}')
  print('\n| recipe | batch | cnnjax ms/step | TF ms/step | cnnjax ex/s | TF ex/s | cnnjax / TF |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['recipe']} `{r['config']}` | {r['batch']} | {r['cnnjax_ms']:.1f} | "
          f"{r['tf_ms']:.1f} | {r['cnnjax_eps']:,.0f} | {r['tf_eps']:,.0f} | "
          f"**{r['ratio']:.2f}x** |")


if __name__ == '__main__':
  main()
