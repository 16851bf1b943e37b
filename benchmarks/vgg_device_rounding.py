"""How far apart float rounding alone puts two runs of the VGG 1-vs-8-devices test: a
diagnosis of that test's tolerance, not a test.

Usage: python benchmarks/vgg_device_rounding.py   (about 2 minutes on 2 cores)

tests/test_parallel.py::test_batch_norm_and_dropout_on_eight_devices_train_like_one trains
VGG-16 (configs/cifar_vgg16.py with the test's VGG overrides: 2 SGD steps of 16 images)
on 1 device and on 8 and compares each layer's update. Here, in one process with 8 CPU
devices, on the test's own batches (its feed's rows for steps 0 and 1) and XLA's kernels,
the one-device update is set beside: the 8-device and 2-device ones (summation order
only), and one-device runs from the same weights moved by one float32 ulp (each weight
times 1 +/- 2**-23, three random sign patterns). Prints, for each, the second step's loss
and the largest and median relative difference of a layer's update (fc1's bias left
out, as the test does: its true gradient is 0). Result: docs/RESULTS.md.
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

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from cnnjax import cpu, data, state as state_lib, train  # noqa: E402
from tests.conftest import recipe_config  # noqa: E402
from tests.test_parallel import VGG, relative_error  # noqa: E402


def two_step_update(config, spec, batches, devices, ulp_seed=None):
  """(each parameter's update after the two steps, the second step's loss) on `devices`;
  with `ulp_seed`, from the initial weights moved by one ulp."""
  mesh = jax.make_mesh((devices,), ('batch',), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:devices])
  run = state_lib.build(config, spec, mesh)
  initial = run.state
  if ulp_seed is not None:
    rng = np.random.default_rng(ulp_seed)
    moved = jax.tree.map(lambda p: (np.asarray(p) * (1 + 2.0**-23 * rng.choice([-1, 1], p.shape))
                                    ).astype(np.float32), initial.params)
    initial = initial.replace(params=jax.device_put(moved, run.replicated))
  step = run.jit(functools.partial(train.train_step, augment_cfg=config.augment.lock(),
                                   weight_loss_terms=state_lib.weight_loss_terms(config),
                                   weight_loss_on=config.weight_loss_on),
                 out_shardings=(run.replicated, run.replicated))
  state = initial
  for batch in batches:
    state, metrics = step(state, jax.device_put(batch, run.batch_sharded))
  update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                        state.params, initial.params)
  return update, float(metrics['loss'])


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
  for label, devices, seed in [('8 devices', 8, None), ('2 devices', 2, None),
                               *((f'1 device, weights moved an ulp (seed {s})', 1, s)
                                 for s in range(3))]:
    other, loss = two_step_update(config, spec, batches, devices, seed)
    errors = {n: relative_error(a, b) for n, a, b in
              zip(names, jax.tree.leaves(one), jax.tree.leaves(other), strict=True)
              if n != "['fc1']['bias']"}
    worst = max(errors, key=errors.get)
    print(f'1 device vs {label}: second loss {one_loss:.6f} vs {loss:.6f}; update difference '
          f'largest {errors[worst]:.1e} ({worst}), median {np.median(list(errors.values())):.1e}',
          flush=True)


if __name__ == '__main__':
  main()
