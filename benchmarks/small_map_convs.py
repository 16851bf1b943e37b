"""What padding small maps explicitly is worth: XLA's CPU convolutions whose window is
larger than their input (VGG-16's 3x3 kernels on CIFAR's 2x2 maps), side by side.

    python benchmarks/small_map_convs.py [--recipes F] [--paths xla,auto] [--steps 3]
                                         [--rounds 3] [--isa avx2] [--sweep]

cnnjax/ops.py's `_eigen_conv` pads such a convolution's input itself, behind a barrier,
so that XLA:CPU runs it on Eigen. Here each recipe's real train steps run in two processes
of their own per kernel path (CNNJAX_CPU_KERNELS): `padded`, cnnjax as it is; `folded`,
with `_eigen_conv` replaced by XLA's own convolution (the padding left inside it, as
before). Under `auto` the per-op choice between oneDNN and XLA is made afresh in each
process (a kernel cache of its own), so `padded` may move a layer to XLA's path. Timed in
alternating rounds (benchmarks/side_by_side.py); prints each one's median ms/step, and
under auto the 2x2 maps' choices with both paths' times. --sweep first times XLA's forward
convolution alone, by kernel and map size. Results: docs/RESULTS.md.
"""
import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]

import side_by_side  # noqa: E402
from cnnjax import cpu  # noqa: E402

RECIPES = side_by_side.RECIPES


def serve(recipe, side):
  from cnnjax import bench, config as config_lib, kernels, ops
  if side == 'folded':
    ops._eigen_conv = ops._plain_conv
  s = bench.Synthetic(config_lib.load_file(ROOT / 'configs' / f'{RECIPES[recipe]}.py'),
                      steps_per_call=1)  # every K runs the same step body (a scan)
  s.trace()
  decisions = kernels.describe().splitlines()[1:]
  return side_by_side.serve(s.train_once, s.steps_per_call, {
      'ops_on_xla': sum(' XLA, ' in line for line in decisions),
      'small_maps': [line.strip() for line in decisions if 'x2x2x' in line.split(':')[0]]})


def sweep(channels=256, batch=128):
  """XLA's forward convolution alone (SAME, stride 1) by map and kernel size: as XLA folds
  the padding in; padded first with jnp.pad alone; padded first behind the barrier
  (cnnjax's _eigen_conv)."""
  import time
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cnnjax import ops

  def ms(f, *args):
    f = jax.jit(f)
    for _ in range(2):
      jax.block_until_ready(f(*args))
    times = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      times.append(time.perf_counter() - start)
    return min(times) * 1e3
  rng = np.random.default_rng(0)
  print('| kernel | map | XLA folds the padding, ms (GFLOP/s) | jnp.pad first, no barrier '
        '| padded first (cnnjax), ms (GFLOP/s) |')
  print('|---|---|---|---|---|')
  for k in (3, 5):
    for size in (1, 2, 3, 4, 5, 6, 8):
      x = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
      w = jnp.asarray(rng.normal(size=(k, k, channels, channels)), jnp.float32)
      pads = ((k // 2, k // 2),) * 2
      folded = ms(lambda x, w: ops._plain_conv(x, w, (1, 1), pads), x, w)
      unbarred = ms(lambda x, w: ops._plain_conv(  # XLA folds the pad back in
          jnp.pad(x, ((0, 0), *pads, (0, 0))), w, (1, 1), 'VALID'), x, w)
      padded = ms(lambda x, w: ops._eigen_conv(x, w, (1, 1), pads), x, w)
      gflop = 2 * batch * size * size * k * k * channels * channels / 1e9
      print(f'| {k}x{k} | {size}x{size} | {folded:.1f} ({gflop / folded * 1e3:.0f}) '
            f'| {unbarred:.1f} | {padded:.1f} ({gflop / padded * 1e3:.0f}) |', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--recipes', default='F')
  parser.add_argument('--paths', default='xla,auto', help='CNNJAX_CPU_KERNELS values')
  parser.add_argument('--sweep', action='store_true',
                      help="also XLA's forward convolution alone by map and kernel size")
  side_by_side.add_arguments(parser, 3, 3)
  args = parser.parse_args()
  if args.child:
    return serve(*args.child.split(':'))
  cpu.cap_isa(args.isa)
  print(cpu.describe(), flush=True)
  if args.sweep:
    os.environ['CNNJAX_CPU_KERNELS'] = 'xla'
    sweep()
  rows = []
  for recipe, path, med, _, info in side_by_side.per_recipe_and_path(
      __file__, args.recipes.split(','), args.paths.split(','), ('padded', 'folded'),
      args.steps, args.rounds, own_caches=True):
    on_xla = {side: info[side]['ops_on_xla'] for side in info}
    for side in info:  # the 2x2 maps' choices (auto), with their times
      for line in info[side]['small_maps']:
        print(f'  {side}: {line}')
    rows.append((recipe, path, med, on_xla))
    print(f'{recipe} {path}: padded {med["padded"]:.1f} ms/step, folded {med["folded"]:.1f}',
          flush=True)
  print('\n| recipe | CNNJAX_CPU_KERNELS | padded (cnnjax), ms/step | folded (XLA pads inside '
        'the convolution), ms/step | folded / padded | ops on XLA under auto (padded / folded) |')
  print('|---|---|---|---|---|---|')
  for recipe, path, med, on_xla in rows:
    chosen = f'{on_xla["padded"]} / {on_xla["folded"]}' if path == 'auto' else 'all'
    print(f'| {recipe} ({RECIPES[recipe]}) | {path} | {med["padded"]:.1f} | {med["folded"]:.1f} '
          f'| {med["folded"] / med["padded"]:.2f}x | {chosen} |')


if __name__ == '__main__':
  main()
