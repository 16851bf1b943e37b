"""--mode=bench: time the model like seed 004's time_tensorflow_run, on synthetic input.

Burn-in steps, then `steps` timed ones, each waited for; every 10th step's
duration is printed, then `mean +/- std sec / batch` and examples/sec, for the
forward pass and for forward + backward + update (the real train_step,
augmentation included). Needs no dataset: shapes come from the config.
"""
import datetime
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import config as config_lib, kernels, models, parallel, state as state_lib
from cnnjax.report import log
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
        log(f'{datetime.datetime.now()}: step {i - burn_in}, duration = {duration:.3f}')
  mean, std = float(np.mean(durations)), float(np.std(durations))
  log(f'{datetime.datetime.now()}: {name} across {steps} steps, '
           f'{mean:.3f} +/- {std:.3f} sec / batch ({mean * 1e3:.2f} ms; '
           f'{batch_size / mean:.1f} examples/sec)')
  return {'mean': mean, 'std': std, 'examples_per_sec': batch_size / mean}


class Synthetic:
  """A recipe's real state and jitted steps on one synthetic batch (no dataset needed).

  `train_once()` runs the real train_step (augmentation, loss, weight losses,
  optimizer update, EMA) on a uint8 batch; `forward()` the model alone.
  """

  def __init__(self, config):
    config_lib.validate(config)
    self.batch, self.size, self.channels, self.classes = input_spec(config)
    mesh = parallel.make_mesh()
    parallel.check_divisible('batch size', self.batch, mesh)
    crop = config.augment.crop_size
    if crop and crop > self.size:
      raise UserError(f'augment.crop_size={crop} is larger than the {self.size}x{self.size} input')
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    image_shape = (self.size, self.size, self.channels)
    # 50,000: a nominal train-set size, for schedules counted in epochs.
    _, _, self.state = state_lib.initial_state(config, self.classes, 50000, image_shape, replicated)
    shape = state_lib.input_shape(config, image_shape)
    rng = np.random.default_rng(0)
    self.host_batch = {
        'image': rng.integers(0, 256, (self.batch, *image_shape), dtype=np.uint8),
        'label': rng.integers(0, self.classes, self.batch).astype(np.int32)}
    self.batch_data = parallel.put_batch(self.host_batch, sharded)
    self.images = jax.device_put(jnp.asarray(rng.normal(size=(self.batch, *shape)), jnp.float32),
                                 sharded)
    self.variables = {'params': self.state.params}
    if self.state.batch_stats is not None:
      self.variables['batch_stats'] = self.state.batch_stats
    apply_fn = self.state.apply_fn
    self._forward = jax.jit(lambda v, x: apply_fn(v, x, train=False), out_shardings=sharded)
    self._step = state_lib.jit_train_step(config, self.state.params, replicated)

  def forward(self):
    return self._forward(self.variables, self.images)

  def train_once(self):
    self.state, metrics = self._step(self.state, self.batch_data)
    return metrics['loss']


def run(config):
  s = Synthetic(config)
  log(f'bench: {config.model}, {models.param_count(s.state.params):,} parameters, '
           f'batch {s.batch} of {s.size}x{s.size}x{s.channels}, {jax.device_count()} x '
           f'{jax.devices()[0].device_kind}; kernels: {kernels.describe()}')
  b = config.bench
  results = {'forward': time_run('Forward', s.forward, b.burn_in, b.steps, s.batch)}
  results['forward_backward'] = time_run('Forward-backward', s.train_once, b.burn_in, b.steps,
                                         s.batch)
  if not math.isfinite(float(s.train_once())):
    raise UserError('bench: the loss became non-finite on synthetic data')
  return results
