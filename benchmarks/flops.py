"""This machine's float32 matmul limit, and a train step's floating-point work.

    python benchmarks/flops.py [--isa avx2] [--config configs/cifar_lrn.py]

matmul_peak(): the best GFLOP/s of a large square float32 matmul on all cores, through
XLA (jax.numpy.dot, jitted) and through NumPy's BLAS, each the best of several runs at
2048 and 4096: what the machine can do at all, the ceiling a train step is measured
against (benchmarks/cpu_vs_tf.py). step_flops(config): floating-point operations of one
train step of the recipe, from XLA's cost analysis of the step compiled on XLA's path
(oneDNN's custom calls are opaque to it), per example. Results: docs/RESULTS.md.
"""
import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnjax import cpu  # noqa: E402

if __name__ == '__main__':
  cpu.cap_isa_from_argv(sys.argv)  # before jax loads XLA
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _best_rate(fn, n, repeats):
  fn()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e9


def matmul_peak(sizes=(2048, 4096), repeats=5):
  """{'xla': GFLOP/s, 'numpy': GFLOP/s}: the best over sizes and repeats of each."""
  rates = {'xla': 0.0, 'numpy': 0.0}
  dot = jax.jit(jnp.dot)
  for n in sizes:
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    x = jnp.asarray(a)
    rates['xla'] = max(rates['xla'], _best_rate(lambda: dot(x, x).block_until_ready(), n,
                                                repeats))
    rates['numpy'] = max(rates['numpy'], _best_rate(lambda: a @ a, n, repeats))
  return rates


def step_flops(config):
  """Floating-point operations of one train step of `config`, per example."""
  from cnnjax import bench, kernels
  with kernels.using('xla'):
    s = bench.Synthetic(config, steps_per_call=1)
    cost = s._steps.lower(s.state, s.inputs, None).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['flops'] / s.batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', action='append', default=[],
                      help='also print the train step\'s MFLOP per example (repeatable)')
  parser.add_argument('--isa', choices=list(cpu.ISA_CAPS), default='native',
                      help='cap XLA at this ISA (cnnjax/cpu.py)')
  args = parser.parse_args()
  print(cpu.describe())
  rates = matmul_peak()
  print(f'float32 matmul: XLA {rates["xla"]:.1f} GFLOP/s, NumPy {rates["numpy"]:.1f} GFLOP/s; '
        f'limit {max(rates.values()):.1f} GFLOP/s')
  from cnnjax import config as config_lib
  for path in args.config:
    print(f'{path}: {step_flops(config_lib.load_file(path)) / 1e6:.1f} MFLOP per example trained')


if __name__ == '__main__':
  main()
