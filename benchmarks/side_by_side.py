"""Two (or more) train steps timed side by side, each in a process of its own.

Each side runs in a child process kept alive for the whole comparison, with its own
environment (XLA_FLAGS, cnnjax's malloc setting: a framework is measured as its users
run it, not with the other's process settings). The driver alternates timed runs
between the children, so they share the machine's state, while the others wait idle
on their stdin. Used by benchmarks/cpu_vs_tf.py, plain_jax_step.py, xla_cpu_flags.py,
small_map_convs.py and dropout_draws.py.

Protocol: the child prints 'ready <json>' once warmed up, then for each 'go N' line on
stdin runs N steps, waits for the last, and prints the seconds per step.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# The recipes by the letters docs/RESULTS.md's tables use (--recipes A,D,E).
RECIPES = {'A': 'cifar_lrn', 'B': 'cifar_cookbook', 'C': 'cifar_tutorial', 'D': 'mnist_cnn',
           'E': 'cifar_deep', 'F': 'cifar_vgg16'}


def add_arguments(parser, steps, rounds, children=None, steps_help='steps per timed run'):
  """The options every side-by-side benchmark takes: --steps and --rounds (their defaults
  given), --isa, and the hidden --child that starts one side (one of `children`)."""
  from cnnjax import cpu
  parser.add_argument('--steps', type=int, default=steps, help=steps_help)
  parser.add_argument('--rounds', type=int, default=rounds)
  parser.add_argument('--isa', choices=list(cpu.ISA_CAPS), default='native',
                      help='cap oneDNN and XLA (and TensorFlow, where it runs) at this ISA '
                      '(cnnjax/cpu.py)')
  parser.add_argument('--child', choices=children, help=argparse.SUPPRESS)


class Child:
  def __init__(self, argv, env=None):
    self.proc = subprocess.Popen([sys.executable, *argv], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    line = self.proc.stdout.readline()
    if not line.startswith('ready '):
      self.proc.kill()
      raise RuntimeError(f'{argv}: did not start (said {line!r}, exit {self.proc.wait()})')
    self.info = json.loads(line[len('ready '):])

  def time(self, steps):
    """Seconds per step over `steps` steps."""
    self.proc.stdin.write(f'go {steps}\n')
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    return self.proc.wait()


def serve(run, steps_per_call=1, info=None, warmup=3):
  """The child's side: run() does steps_per_call steps and returns something to wait for."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(run())
  print('ready', json.dumps(info or {}), flush=True)
  for line in sys.stdin:
    calls = max(1, int(line.split()[1]) // steps_per_call)
    start = time.perf_counter()
    for _ in range(calls):
      out = run()
    jax.block_until_ready(out)
    print((time.perf_counter() - start) / (calls * steps_per_call), flush=True)


def alternate(children, steps, rounds):
  """{name: [seconds per step, one per round]}, the children timed in turn each round."""
  times = {name: [] for name in children}
  for _ in range(rounds):
    for name, child in children.items():
      times[name].append(child.time(steps[name] if isinstance(steps, dict) else steps))
  return times


def per_recipe_and_path(script, recipes, paths, sides, steps, rounds, own_caches=False):
  """Each recipe's step on each CPU kernel path (CNNJAX_CPU_KERNELS), one child per side
  (`script --child RECIPE:SIDE`), timed in alternation. Yields (recipe, path, {side: median
  ms/step}, {side: each round's ms/step}, {side: the child's ready info}). own_caches: each
  child chooses its kernels afresh (a cache of its own); else they share the user's."""
  for recipe in recipes:
    for path in paths:
      children = {}
      with contextlib.ExitStack() as caches:  # own_caches: removed once the children end
        for side in sides:
          env = {**os.environ, 'CNNJAX_CPU_KERNELS': path}
          if own_caches:
            env['CNNJAX_KERNEL_CACHE'] = os.path.join(caches.enter_context(
                tempfile.TemporaryDirectory(prefix='kernel_cache_')), 'choices.json')
          children[side] = Child([script, '--child', f'{recipe}:{side}'], env=env)
        times = alternate(children, steps, rounds)
        for child in children.values():
          child.close()
      yield (recipe, path, {side: statistics.median(t) * 1e3 for side, t in times.items()},
             {side: [t * 1e3 for t in ts] for side, ts in times.items()},
             {side: child.info for side, child in children.items()})
