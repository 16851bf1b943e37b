"""How far apart float rounding alone puts two runs of the VGG 1-vs-8-devices test: a
diagnosis of that test's tolerance, not a test.

Usage: python benchmarks/vgg_device_rounding.py   (about 2.5 minutes on 2 cores)

tests/test_parallel.py::test_batch_norm_and_dropout_on_eight_devices_train_like_one trains
VGG-16 (configs/cifar_vgg16.py with the test's VGG overrides: 2 SGD steps of 16 images)
on 1 device and on 8 and compares each layer's update. Here, in one process with 8 CPU
devices, on the test's own batches (its feed's rows for steps 0 and 1) and XLA's kernels,
the one-device update is set beside: the 8-device and 2-device ones (summation order
only), and one-device runs from the same weights moved by one float32 ulp (each weight
times 1 +/- 2**-23, three random sign patterns). Prints, for each, the second step's loss
and the largest and median relative difference of a layer's update (fc1's bias left
out, as the test does: its true gradient is 0).

Then the trace of what rounding flips: the first step's ReLU inputs (every batch norm's
output) on 1 and on 8 devices, the units whose sign differs and the max-pool windows
whose choice differs, and the 8-device run once more with those inputs moved to their
one-device value in the first step (the difference added, so their gradient still
flows): if it then matches the one-device run, those discrete choices are the whole
difference. Result: docs/RESULTS.md.
"""
import functools
import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('CNNJAX_CPU_KERNELS', 'xla')  # as the test's runs
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from cnnjax import augment, cpu, data, models, parallel, state as state_lib, train  # noqa: E402
from tests.conftest import recipe_config  # noqa: E402
from tests.test_parallel import VGG, relative_error  # noqa: E402


def mesh_of(devices):
  return parallel.make_mesh(jax.devices()[:devices])


def relu_inputs(config, spec, batch, devices):
  """{batch-norm layer: its output} in the first training step's forward pass (the step's
  own augmentation and dropout keys), each a ReLU's input."""
  run = state_lib.build(config, spec, mesh_of(devices))

  def forward(state, batch):
    key, dropout_key = train.step_keys(state)
    images = augment.preprocess(key, batch['image'], config.augment.lock(), train=True)
    _, captured = state.apply_fn(
        {'params': state.params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': dropout_key}, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda module, _: isinstance(module, nn.BatchNorm))
    return {name: out['__call__'][0] for name, out in captured['intermediates'].items()}
  return jax.device_get(run.jit(forward, out_shardings=run.replicated)(
      run.state, jax.device_put(batch, run.batch_sharded)))


def moved_units(nudges):
  """An interceptor adding nudges[layer] = [(index, delta)] to those batch norms' outputs."""
  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      for index, delta in nudges.get(context.module.name, ()):
        y = y.at[index].add(delta)
    return y
  return interceptor


def two_step_update(config, spec, batches, devices, ulp_seed=None, nudges=None):
  """(each parameter's update after the two steps, the second step's loss) on `devices`;
  with `ulp_seed`, from the initial weights moved by one ulp; with `nudges`, the first
  step's batch-norm outputs moved by them (moved_units)."""
  run = state_lib.build(config, spec, mesh_of(devices))
  initial = run.state
  if ulp_seed is not None:
    rng = np.random.default_rng(ulp_seed)
    moved = jax.tree.map(lambda p: (np.asarray(p) * (1 + 2.0**-23 * rng.choice([-1, 1], p.shape))
                                    ).astype(np.float32), initial.params)
    initial = initial.replace(params=jax.device_put(moved, run.replicated))
  plain = functools.partial(train.train_step, augment_cfg=config.augment.lock(),
                            weight_loss_terms=state_lib.weight_loss_terms(config),
                            weight_loss_on=config.weight_loss_on)

  def nudged(state, batch):
    with nn.intercept_methods(moved_units(nudges)):
      return plain(state, batch)
  jitted = lambda fn: run.jit(fn, out_shardings=(run.replicated, run.replicated))
  step = jitted(plain)
  steps = [jitted(nudged) if nudges else step, step]  # one compile where nothing is moved
  state = initial
  for step, batch in zip(steps, batches, strict=True):
    state, metrics = step(state, jax.device_put(batch, run.batch_sharded))
  update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                        state.params, initial.params)
  return update, float(metrics['loss'])


# The batch norms whose ReLU output a 2x2/2 max pool takes: each group's last.
POOLED = {f'bn{g}_{len(drops)}' for g, (_, drops) in enumerate(models.VGG16_CIFAR_GROUPS, 1)}


def pool_windows(relu_input):
  """Each 2x2/2 max-pool window's four ReLU outputs, row-major: (n, h/2, w/2, c, 4)."""
  n, h, w, c = relu_input.shape
  windows = np.maximum(relu_input, 0).reshape(n, h // 2, 2, w // 2, 2, c)
  return windows.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)


def pool_choice(relu_input):
  """Which of each window's four the max pool takes (ops.max_pool's rule: the first maximum)."""
  return pool_windows(relu_input).argmax(-1)


def near_ties(relu_inputs):
  """How many ReLU inputs lie within 3e-6 of 0, and how many max-pool windows have their top
  two within 1e-4 (relative) of each other: the choices rounding can flip."""
  relu = sum(int((np.abs(x) < 3e-6).sum()) for x in relu_inputs.values())
  top_two = [np.sort(pool_windows(relu_inputs[name]), -1)[..., 2:].reshape(-1, 2)
             for name in sorted(POOLED)]
  top_two = np.concatenate([t[t[:, 1] > 0] for t in top_two])
  close = int(((top_two[:, 1] - top_two[:, 0]) < 1e-4 * top_two[:, 1]).sum())
  return (f'{relu} ReLU inputs within 3e-6 of 0; {close} of {len(top_two):,} max-pool windows '
          'with their top two within 1e-4 (relative)')


def flips(one_in, eight_in):
  """{layer: [(index, one-device value - eight-device value)]} for each ReLU input whose sign
  differs between the runs, and the four inputs of each max-pool window whose choice
  differs; printed as found."""
  nudges = {}
  for name, a in one_in.items():
    b = eight_in[name]
    sign = (a > 0) != (b > 0)
    pool = np.zeros_like(sign)
    if name in POOLED:
      pool = np.repeat(np.repeat(pool_choice(a) != pool_choice(b), 2, 1), 2, 2)
    for index in map(tuple, np.argwhere(sign | pool)):
      nudges.setdefault(name, []).append((index, a[index] - b[index]))
      print(f'first step, {name}{list(map(int, index))} (image, row, column, channel): '
            f'{"ReLU sign" if sign[index] else "max-pool choice"}: input {a[index]:.7g} on 1 '
            f'device, {b[index]:.7g} on 8', flush=True)
      if name in POOLED:
        n, y, x, c = index
        window = a[n, y - y % 2:y - y % 2 + 2, x - x % 2:x - x % 2 + 2, c]
        print(f'  its max-pool window\'s ReLU inputs on 1 device: {window.ravel().tolist()}')
  return nudges


def main():
  print(cpu.describe(), f'jax {jax.__version__}')
  config = recipe_config('cifar_vgg16', **VGG)
  source = data.info(config.dataset)
  spec = state_lib.DataSpec.of(source, config.train_split)
  shards = data.load_train(source, config.train_split, config.batch_size,
                           config.input_shards or 1, 0, 1)
  batches = [{k: v for k, v in shards.batch(config.seed, step).items() if k != 'index'}
             for step in range(config.num_train_steps)]
  one, one_loss = two_step_update(config, spec, batches, 1)
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(one)[0]]
  one_in, eight_in = (relu_inputs(config, spec, batches[0], d) for d in (1, 8))
  print('first step, 1 device:', near_ties(one_in))
  nudges = flips(one_in, eight_in)
  print(f'{sum(map(len, nudges.values()))} ReLU / max-pool inputs of the first step moved, out '
        f'of {sum(a.size for a in one_in.values()):,}')
  runs = [('8 devices', 8, None, None), ('2 devices', 2, None, None),
          *((f'1 device, weights moved an ulp (seed {s})', 1, s, None) for s in range(3)),
          ('8 devices, those inputs moved to their 1-device value', 8, None, nudges)]
  for label, devices, seed, moved in runs:
    other, loss = two_step_update(config, spec, batches, devices, seed, moved)
    errors = {n: relative_error(a, b) for n, a, b in
              zip(names, jax.tree.leaves(one), jax.tree.leaves(other), strict=True)
              if n != "['fc1']['bias']"}
    worst = max(errors, key=errors.get)
    print(f'1 device vs {label}: second loss {one_loss:.6f} vs {loss:.6f}; update difference '
          f'largest {errors[worst]:.1e} ({worst}), median {np.median(list(errors.values())):.1e}',
          flush=True)


if __name__ == '__main__':
  main()
