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

from cnnjax import config as config_lib, feed, kernels, models, parallel, state as state_lib
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
    source = data.info(config.dataset, config.data_dir, download=False)
    size, _, channels = source.image_shape
    classes = source.num_classes
  return (b.batch_size or config.batch_size, b.image_size or size, b.channels or channels,
          b.num_classes or classes)


def time_run(name, fn, burn_in, steps, batch_size, steps_per_call=1):
  """The seed's time_tensorflow_run: per-step wall time after burn-in, each call waited
  for; a call of fn runs `steps_per_call` steps (one dispatch), timed as that many."""
  calls, burn_in = max(1, steps // steps_per_call), -(-burn_in // steps_per_call)
  durations = []
  for i in range(burn_in + calls):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    duration = (time.perf_counter() - start) / steps_per_call
    if i >= burn_in:
      durations.append(duration)
      step = (i - burn_in) * steps_per_call
      if step % 10 < steps_per_call:
        log(f'{datetime.datetime.now()}: step {step}, duration = {duration:.3f}')
  mean, std = float(np.mean(durations)), float(np.std(durations))
  log(f'{datetime.datetime.now()}: {name} across {calls * steps_per_call} steps, '
           f'{mean:.3f} +/- {std:.3f} sec / batch ({mean * 1e3:.2f} ms; '
           f'{batch_size / mean:.1f} examples/sec)')
  return {'mean': mean, 'std': std, 'examples_per_sec': batch_size / mean}


def synthetic_batch(batch, size, channels, classes):
  """The uint8 batch bench mode trains on (seeded: benchmarks/cpu_vs_tf.py feeds TF the same)."""
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8),
          'label': rng.integers(0, classes, batch).astype(np.int32)}


class Synthetic:
  """A recipe's real state and jitted steps on one synthetic batch (no dataset needed).

  `train_once()` runs the real train steps (augmentation, loss, weight losses,
  optimizer update, EMA) on a uint8 batch, `steps_per_call` of them in one dispatch
  (default: config.steps_per_dispatch), as training does; `forward()` the model alone.
  """

  def __init__(self, config, steps_per_call=None):
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
    _, learning_rate, self.state = state_lib.initial_state(config, self.classes, 50000,
                                                           image_shape, replicated)
    shape = state_lib.input_shape(config, image_shape)
    self.host_batch = synthetic_batch(self.batch, self.size, self.channels, self.classes)
    rng = np.random.default_rng(1)
    self.steps_per_call = steps_per_call or config.steps_per_dispatch
    self.inputs = parallel.put_batch(
        {k: np.stack([v] * self.steps_per_call) for k, v in self.host_batch.items()},
        feed.steps_sharding(mesh))
    self.images = jax.device_put(jnp.asarray(rng.normal(size=(self.batch, *shape)), jnp.float32),
                                 sharded)
    self.variables = {'params': self.state.params}
    if self.state.batch_stats is not None:
      self.variables['batch_stats'] = self.state.batch_stats
    apply_fn = self.state.apply_fn
    self._forward = jax.jit(lambda v, x: apply_fn(v, x, train=False), out_shardings=sharded)
    self._steps = state_lib.jit_train_steps(config, self.state.params, replicated,
                                            feed.HostFeed.fetch, learning_rate)

  def forward(self):
    return self._forward(self.variables, self.images)

  def train_once(self):
    self.state, metrics = self._steps(self.state, self.inputs, None)
    return metrics['loss'][-1]

  def trace(self):
    """Traces the steps without running them: the CPU kernels are chosen then
    (kernels.describe() lists them)."""
    jax.eval_shape(self._steps, self.state, self.inputs, None)
    jax.eval_shape(self._forward, self.variables, self.images)

  def compiled_text(self):
    """The compiled train steps' HLO (benchmarks/profile_step.py, tests)."""
    return self._steps.lower(self.state, self.inputs, None).compile().as_text()


def run(config):
  s = Synthetic(config)
  s.trace()
  log(f'bench: {config.model}, {models.param_count(s.state.params):,} parameters, '
           f'batch {s.batch} of {s.size}x{s.size}x{s.channels}, {jax.device_count()} x '
           f'{jax.devices()[0].device_kind}; {s.steps_per_call} train step(s) per dispatch; '
           f'kernels: {kernels.describe()}')
  b = config.bench
  results = {'forward': time_run('Forward', s.forward, b.burn_in, b.steps, s.batch)}
  results['forward_backward'] = time_run('Forward-backward', s.train_once, b.burn_in, b.steps,
                                         s.batch, s.steps_per_call)
  if not math.isfinite(float(s.train_once())):
    raise UserError('bench: the loss became non-finite on synthetic data')
  return results
