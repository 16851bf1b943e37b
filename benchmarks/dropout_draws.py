"""What writing the dropout draws out is worth on the CPU: cnnjax's ops.bernoulli beside
jax.random.bernoulli (the same bits), side by side.

    python benchmarks/dropout_draws.py [--recipes F] [--paths auto,xla] [--steps 3]
                                       [--rounds 5] [--isa avx2] [--masks]

On the CPU backend JAX lowers threefry2x32 as a rolled loop over whole arrays, which XLA
fuses with nothing; ops.bernoulli writes the hash out, so XLA fuses the draw into the select
that applies the mask. Each recipe's real train steps run in two processes of their own
per kernel path (CNNJAX_CPU_KERNELS): `written`, cnnjax as it is; `rolled`, with
ops.bernoulli replaced by jax.random.bernoulli. Timed in alternating rounds
(benchmarks/side_by_side.py); prints each one's median ms/step. --masks first times one
masked select alone at each of Recipe F's dropout shapes. Results: docs/RESULTS.md.
"""
import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]

import side_by_side  # noqa: E402
from cnnjax import cpu  # noqa: E402

RECIPES = side_by_side.RECIPES
SIDES = ('written', 'rolled')


def serve(recipe, side):
  import jax
  from cnnjax import bench, config as config_lib, ops
  if side == 'rolled':
    ops.bernoulli = jax.random.bernoulli
  s = bench.Synthetic(config_lib.load_file(ROOT / 'configs' / f'{RECIPES[recipe]}.py'),
                      steps_per_call=1)
  return side_by_side.serve(s.train_once, s.steps_per_call)


def masks(batch=128, rounds=5):
  """jnp.where(bernoulli(key, keep, x.shape), x, 0) alone, at Recipe F's dropout shapes."""
  import time
  import jax
  import jax.numpy as jnp
  from cnnjax import models, ops
  shapes = {}
  size = 32
  for width, drops in models.VGG16_CIFAR_GROUPS:
    for rate in drops:
      if rate:
        shapes.setdefault((batch, size, size, width), rate)
    size //= 2
  shapes[(batch, 512)] = 0.5
  print('| mask shape | keep | jax.random.bernoulli, ms | ops.bernoulli, ms | ratio |')
  print('|---|---|---|---|---|')
  for shape, rate in shapes.items():
    x, key = jnp.ones(shape), jax.random.PRNGKey(0)
    runs = {name: jax.jit(lambda k, x, draw=draw: jnp.where(draw(k, 1.0 - rate, x.shape), x, 0.0))
            for name, draw in (('jax', jax.random.bernoulli), ('ops', ops.bernoulli))}
    best = {name: [] for name in runs}
    for f in runs.values():
      jax.block_until_ready(f(key, x))
    for _ in range(rounds):  # alternating
      for name, f in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(f(key, x))
        best[name].append(time.perf_counter() - start)
    jax_ms, ops_ms = (min(best[n]) * 1e3 for n in ('jax', 'ops'))
    print(f'| {"x".join(map(str, shape))} | {1 - rate:.1f} | {jax_ms:.2f} | {ops_ms:.2f} '
          f'| {jax_ms / ops_ms:.2f}x |', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--recipes', default='F')
  parser.add_argument('--paths', default='auto,xla', help='CNNJAX_CPU_KERNELS values')
  parser.add_argument('--masks', action='store_true',
                      help="also one masked select alone at each of Recipe F's dropout shapes")
  side_by_side.add_arguments(parser, 3, 5)
  args = parser.parse_args()
  if args.child:
    return serve(*args.child.split(':'))
  cpu.cap_isa(args.isa)
  print(cpu.describe(), flush=True)
  if args.masks:
    masks()
  rows = []
  for recipe, path, med, rounds, _ in side_by_side.per_recipe_and_path(
      __file__, args.recipes.split(','), args.paths.split(','), SIDES, args.steps, args.rounds):
    rows.append((recipe, path, med))
    print(f'{recipe} {path}: written {med["written"]:.1f} ms/step, rolled {med["rolled"]:.1f}'
          f' (rounds: {", ".join(f"{t:.0f}" for t in rounds["written"])} / '
          f'{", ".join(f"{t:.0f}" for t in rounds["rolled"])})', flush=True)
  print('\n| recipe | CNNJAX_CPU_KERNELS | written (cnnjax), ms/step | rolled '
        '(jax.random.bernoulli), ms/step | rolled / written |')
  print('|---|---|---|---|---|')
  for recipe, path, med in rows:
    print(f'| {recipe} ({RECIPES[recipe]}) | {path} | {med["written"]:.1f} | '
          f'{med["rolled"]:.1f} | {med["rolled"] / med["written"]:.2f}x |')


if __name__ == '__main__':
  main()
