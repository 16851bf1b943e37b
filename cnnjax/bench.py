"""--mode=bench: time the model like seed 004's time_tensorflow_run, on synthetic input.

Burn-in steps, then `steps` timed ones, each waited for; every 10th step's
duration is printed, then `mean +/- std sec / batch` and examples/sec, for the
forward pass and for forward + backward + update (the real train_step,
augmentation included). Needs no dataset: shapes come from the config.
"""
import datetime
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import config as config_lib, loop, models, parallel, train
from cnnjax.errors import UserError

# (image size, channels, classes) of datasets whose shapes bench knows without TFDS.
KNOWN_SHAPES = {'cifar10': (32, 3, 10), 'mnist': (28, 1, 10), 'imagenet2012': (224, 3, 1000)}


def input_spec(config):
  """(batch, image size, channels, classes), from config.bench else the dataset."""
  b = config.bench
  if config.dataset in KNOWN_SHAPES:
    size, channels, classes = KNOWN_SHAPES[config.dataset]
  else:
    from cnnjax import data
    info = data.info(config.dataset, config.data_dir, download=False).info
    size, _, channels = info.features['image'].shape
    classes = info.features['label'].num_classes
  return (b.batch_size or config.batch_size, b.image_size or size, b.channels or channels,
          b.num_classes or classes)


def time_run(name, fn, burn_in, steps, batch_size):
  """The seed's time_tensorflow_run: per-step wall time after burn-in, each step waited for."""
  durations = []
  for i in range(burn_in + steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    duration = time.perf_counter() - start
    if i >= burn_in:
      durations.append(duration)
      if (i - burn_in) % 10 == 0:
        loop.log(f'{datetime.datetime.now()}: step {i - burn_in}, duration = {duration:.3f}')
  mean, std = float(np.mean(durations)), float(np.std(durations))
  loop.log(f'{datetime.datetime.now()}: {name} across {steps} steps, '
           f'{mean:.3f} +/- {std:.3f} sec / batch ({mean * 1e3:.2f} ms; '
           f'{batch_size / mean:.1f} examples/sec)')
  return {'mean': mean, 'std': std, 'examples_per_sec': batch_size / mean}


def run(config):
  config_lib.validate(config)
  batch, size, channels, classes = input_spec(config)
  mesh = parallel.make_mesh()
  parallel.check_divisible('batch size', batch, mesh)
  crop = config.augment.crop_size
  if crop and crop > size:
    raise UserError(f'augment.crop_size={crop} is larger than the {size}x{size} input')
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  # 50,000: a nominal train-set size, for schedules counted in epochs.
  _, _, state = loop.initial_state(config, classes, 50000, (size, size, channels), replicated)
  shape = loop.input_shape(config, (size, size, channels))
  rng = np.random.default_rng(0)
  batch_data = parallel.put_batch({
      'image': rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8),
      'label': rng.integers(0, classes, batch).astype(np.int32)}, sharded)
  images = jax.device_put(jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32), sharded)
  loop.log(f'bench: {config.model}, {models.param_count(state.params):,} parameters, '
           f'batch {batch} of {size}x{size}x{channels}, {jax.device_count()} x '
           f'{jax.devices()[0].device_kind}')

  variables = {'params': state.params}
  if state.batch_stats is not None:
    variables['batch_stats'] = state.batch_stats
  forward = jax.jit(lambda v, x: state.apply_fn(v, x, train=False), out_shardings=sharded)
  terms = loop.weight_loss_terms(config, state.params)
  step = jax.jit(functools.partial(train.train_step, augment_cfg=config.augment.lock(),
                                   coefficients=terms, ema_decay=config.ema_decay),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  b = config.bench
  results = {'forward': time_run('Forward', lambda: forward(variables, images), b.burn_in,
                                 b.steps, batch)}
  holder = [state]

  def train_once():
    holder[0], metrics = step(holder[0], batch_data)
    return metrics['loss']

  results['forward_backward'] = time_run('Forward-backward', train_once, b.burn_in, b.steps,
                                         batch)
  if not math.isfinite(float(train_once())):
    raise UserError('bench: the loss became non-finite on synthetic data')
  return results
