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

# Datasets bench knows without reading them: (classes, image shape, train examples).
KNOWN_DATASETS = {'cifar10': state_lib.DataSpec(10, (32, 32, 3), 50000),
                  'mnist': state_lib.DataSpec(10, (28, 28, 1), 60000),
                  'imagenet2012': state_lib.DataSpec(1000, (224, 224, 3), 1281167)}


def bench_config(config):
  """The config bench runs: config.bench's batch size where it sets one."""
  config = config.copy_and_resolve_references()
  config.batch_size = config.bench.batch_size or config.batch_size
  return config


def data_spec(config):
  """The synthetic dataset's description: config.bench's sizes where it sets them, else the
  dataset's (read from TFDS or the arrays file where bench does not know it)."""
  known = KNOWN_DATASETS.get(config.dataset)
  if known is None:
    from cnnjax import data
    known = state_lib.DataSpec.of(data.info(config.dataset, config.data_dir, download=False),
                                  config.train_split)
  b = config.bench
  h, w, channels = known.image_shape
  return state_lib.DataSpec(b.num_classes or known.num_classes,
                            (b.image_size or h, b.image_size or w, b.channels or channels),
                            known.num_train)


def input_spec(config, spec=None):
  """(batch, image size, channels, classes) of the synthetic batch; spec: data_spec(config),
  where already known."""
  spec = spec or data_spec(config)
  return (bench_config(config).batch_size, spec.image_shape[0], spec.image_shape[2],
          spec.num_classes)


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
          'label': rng.integers(0, classes, batch).astype(np.int32),
          'index': np.arange(batch, dtype=np.int32)}


class Synthetic:
  """A recipe's real state and jitted steps on one synthetic batch (no dataset needed).

  `train_once()` runs the real train steps (augmentation, loss, weight losses,
  optimizer update, EMA) on a uint8 batch, `steps_per_call` of them in one dispatch
  (default: config.steps_per_dispatch), as training does; `forward()` the model alone.
  """

  def __init__(self, config, steps_per_call=None):
    config_lib.validate(config)  # before reading a dataset's description
    config, spec = bench_config(config), data_spec(config)
    self.batch, self.size, self.channels, self.classes = input_spec(config, spec)
    mesh = parallel.make_mesh()
    run = state_lib.build(config, spec, mesh)
    self.state = run.state
    shape = state_lib.input_shape(config, run.data.image_shape)
    self.host_batch = synthetic_batch(self.batch, self.size, self.channels, self.classes)
    rng = np.random.default_rng(1)
    self.steps_per_call = steps_per_call or config.steps_per_dispatch
    self.inputs = parallel.put_batch(
        {k: np.stack([v] * self.steps_per_call) for k, v in self.host_batch.items()},
        feed.steps_sharding(mesh))
    self.images = jax.device_put(jnp.asarray(rng.normal(size=(self.batch, *shape)), jnp.float32),
                                 run.batch_sharded)
    self.variables = {'params': self.state.params}
    if self.state.batch_stats is not None:
      self.variables['batch_stats'] = self.state.batch_stats
    apply_fn = self.state.apply_fn
    self._forward = run.jit(lambda v, x: apply_fn(v, x, train=False),
                            out_shardings=run.batch_sharded)
    self._steps = run.train_steps(feed.HostFeed.fetch)

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
