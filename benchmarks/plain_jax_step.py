"""cnnjax's XLA path beside a plain jitted JAX step of the same network, timed side by side.

    python benchmarks/plain_jax_step.py [--steps 20] [--rounds 5] [--isa avx2]

The peer: Recipe A's network and step written as a JAX user would without cnnjax
(flax.linen's Conv and Dense, nn.max_pool (reduce_window, whose gradient XLA writes as
select_and_scatter), tf.nn.lrn as a jnp expression left to autodiff, optax.adam, the
weight losses), on the same augmentation (cnnjax.augment), jitted as one step per call,
with jaxlib's default XLA flags. Against it: cnnjax's real train steps on XLA's own
kernels (CNNJAX_CPU_KERNELS=xla, as every install without the oneDNN extension runs),
at the config's steps per dispatch and at one. Each runs in a process of its own (the
two need different XLA_FLAGS; benchmarks/side_by_side.py), timed in alternating rounds;
prints each one's median ms/step. Results: docs/RESULTS.md.
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

SIDES = ('plain', 'cnnjax_k10', 'cnnjax_k1')


def plain_step_runner():
  """A () -> result function running one plain JAX train step of Recipe A (batch 128)."""
  os.environ['CNNJAX_KEEP_FREED_MEMORY'] = '0'  # glibc's malloc as a JAX user has it
  import jax
  jax.devices()  # XLA reads XLA_FLAGS now: jaxlib's defaults, before cnnjax is imported
  flags = os.environ.get('XLA_FLAGS', '')
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  import optax

  from cnnjax import augment, config as config_lib

  config = config_lib.load_file(ROOT / 'configs' / 'cifar_lrn.py')

  def lrn(x, radius=4, bias=1.0, alpha=0.001 / 9, beta=0.75):
    sq = jnp.pad(jnp.square(x), [(0, 0)] * 3 + [(radius, radius)])
    window = sum(sq[..., i:i + x.shape[-1]] for i in range(2 * radius + 1))
    return x / (bias + alpha * window) ** beta

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      pool = lambda v: nn.max_pool(v, (3, 3), (2, 2), padding='SAME')
      x = lrn(pool(nn.relu(nn.Conv(64, (5, 5), padding='SAME', name='conv1')(x))))
      x = pool(lrn(nn.relu(nn.Conv(64, (5, 5), padding='SAME', name='conv2')(x))))
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(384, name='local3')(x))
      x = nn.relu(nn.Dense(192, name='local4')(x))
      return nn.Dense(10, name='logits')(x)

  net, tx = Net(), optax.adam(config.learning_rate)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))['params']
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (config.batch_size, 32, 32, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, config.batch_size), jnp.int32)
  cfg = config.augment.lock()

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(p):
      x = augment.preprocess(key, images, cfg, train=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(net.apply({'params': p}, x), labels)
      decay = sum(wl * jnp.sum(jnp.square(p[name]['kernel'])) / 2
                  for name, wl in config.weight_loss.items())
      return jnp.mean(ce) + decay
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt_state, jax.random.PRNGKey(1)]

  def run():
    state[2], key = jax.random.split(state[2])
    state[0], state[1], loss = step(state[0], state[1], key)
    return loss
  return run, 1, flags


def cnnjax_runner(k):
  os.environ['CNNJAX_CPU_KERNELS'] = 'xla'
  from cnnjax import bench, config as config_lib
  s = bench.Synthetic(config_lib.load_file(ROOT / 'configs' / 'cifar_lrn.py'), steps_per_call=k)
  return s.train_once, k, os.environ.get('XLA_FLAGS', '')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  side_by_side.add_arguments(parser, 20, 5, SIDES)
  args = parser.parse_args()
  if args.child:
    run, per_call, flags = (plain_step_runner() if args.child == 'plain' else
                            cnnjax_runner(10 if args.child == 'cnnjax_k10' else 1))
    return side_by_side.serve(run, per_call, {'XLA_FLAGS': flags})  # as XLA read them
  cpu.cap_isa(args.isa)
  print(cpu.describe(), flush=True)
  children = {side: side_by_side.Child([__file__, '--child', side]) for side in SIDES}
  for side, child in children.items():
    print(f'{side}: XLA_FLAGS={child.info["XLA_FLAGS"]!r}', flush=True)
  times = side_by_side.alternate(children, args.steps, args.rounds)
  for child in children.values():
    child.close()
  med = {side: statistics.median(t) * 1e3 for side, t in times.items()}
  print('\n| Recipe A train step, batch 128 | ms/step (median) | rounds | vs plain JAX |')
  print('|---|---|---|---|')
  names = {'plain': 'plain jitted JAX step (reduce_window pools, jaxlib defaults)',
           'cnnjax_k10': 'cnnjax, XLA path, 10 steps per dispatch',
           'cnnjax_k1': 'cnnjax, XLA path, 1 step per dispatch'}
  for side in SIDES:
    print(f'| {names[side]} | {med[side]:.1f} | {", ".join(f"{t * 1e3:.0f}" for t in times[side])} '
          f'| {med["plain"] / med[side]:.2f}x |')


if __name__ == '__main__':
  main()
