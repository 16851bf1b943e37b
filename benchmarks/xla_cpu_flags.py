"""Does cnnjax's XLA CPU flag still pay? XLA's own convolutions on Eigen (cnnjax's flag)
against jaxlib's defaults and against YNNPACK's convolutions, side by side.

    python benchmarks/xla_cpu_flags.py [--recipes A,D,E] [--steps 10] [--rounds 5] [--isa avx2]

cnnjax/kernels.py keeps XLA's CPU convolutions off YNNPACK (`YNN_FLAG`). Here each
recipe's real train steps run on XLA's path (CNNJAX_CPU_KERNELS=xla) in three processes
of their own: `eigen`, with cnnjax's flag; `default`, jaxlib's own settings (its CPU
backend started before cnnjax is imported, so the flag comes too late to count); `ynnpack`,
with `+individual_convolution` (a user's own setting of the flag wins over cnnjax's).
Timed in alternating rounds (benchmarks/side_by_side.py); prints each one's median
ms/step. Results: docs/RESULTS.md.
"""
import argparse
import os
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]

import side_by_side  # noqa: E402
from cnnjax import cpu  # noqa: E402

RECIPES = side_by_side.RECIPES
YNNPACK = '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'


def serve(recipe, side):
  os.environ['CNNJAX_CPU_KERNELS'] = 'xla'
  import jax
  if side == 'default':
    jax.devices()  # XLA reads XLA_FLAGS now, before cnnjax would add its flag
  flags = os.environ.get('XLA_FLAGS', '')
  from cnnjax import bench, config as config_lib, kernels
  import jaxlib
  s = bench.Synthetic(config_lib.load_file(ROOT / 'configs' / f'{RECIPES[recipe]}.py'))
  return side_by_side.serve(s.train_once, s.steps_per_call,
                            {'XLA_FLAGS': flags,
                             'jaxlib': jaxlib.__version__, 'cnnjax_flag': kernels.YNN_FLAG})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--recipes', default='A,D,E')
  side_by_side.add_arguments(parser, 10, 5)
  args = parser.parse_args()
  if args.child:
    return serve(*args.child.split(':'))
  cpu.cap_isa(args.isa)
  print(cpu.describe(), flush=True)
  rows = []
  for recipe in args.recipes.split(','):
    flags = os.environ.get('XLA_FLAGS', '')
    children = {
        'eigen': side_by_side.Child([__file__, '--child', f'{recipe}:eigen']),
        'default': side_by_side.Child([__file__, '--child', f'{recipe}:default']),
        'ynnpack': side_by_side.Child([__file__, '--child', f'{recipe}:ynnpack'],
                                      env={**os.environ, 'XLA_FLAGS': f'{flags} {YNNPACK}'})}
    for side, child in children.items():
      print(f'{recipe} {side}: jaxlib {child.info["jaxlib"]}, '
            f'XLA_FLAGS={child.info["XLA_FLAGS"]!r}', flush=True)
    times = side_by_side.alternate(children, args.steps, args.rounds)
    for child in children.values():
      child.close()
    med = {side: statistics.median(t) * 1e3 for side, t in times.items()}
    rows.append((recipe, med))
  print(f'\n| recipe (XLA path, config batch; jaxlib {child.info["jaxlib"]}) | cnnjax flag '
        '(Eigen convolutions), ms/step | jaxlib defaults | +individual_convolution (YNNPACK) '
        '| flag vs defaults |')
  print('|---|---|---|---|---|')
  for recipe, med in rows:
    print(f'| {recipe} ({RECIPES[recipe]}) | {med["eigen"]:.1f} | {med["default"]:.1f} '
          f'| {med["ynnpack"]:.1f} | {med["default"] / med["eigen"]:.2f}x |')


if __name__ == '__main__':
  main()
