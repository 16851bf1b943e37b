"""The imperative shell: load data, build the state, run the loop, log, checkpoint.

train_and_evaluate(config, workdir) is what `python run.py` calls.
"""
import functools
import json
import os
import signal
import time

import jax
import numpy as np

from cnnjax import (checkpoint, config as config_lib, data, kernels, models, optim, parallel,
                    plots, train)
from cnnjax.errors import UserError
from cnnjax.report import Reporter


def log(message):
  if jax.process_index() == 0:
    print(message, flush=True)


def prepare_workdir(workdir):
  try:
    os.makedirs(workdir, exist_ok=True)
    # A probe of this process's own: processes sharing the workdir start at the same instant.
    probe = os.path.join(workdir, f'.write-test-{jax.process_index()}-{os.getpid()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable: {e.strerror}') from None


def input_shape(config, image_shape):
  """The model's input shape: the dataset's images, or their crop."""
  h, w, c = image_shape
  size = config.augment.crop_size
  return (size, size, c) if size else (h, w, c)


def initial_state(config, num_classes, num_train, image_shape, sharding):
  """(model, learning-rate schedule, TrainState initialised from config.seed)."""
  model = models.create(config.model, num_classes)
  learning_rate = optim.learning_rate_fn(config, num_train)
  init = functools.partial(train.create_train_state, model=model,
                           tx=optim.make(config, learning_rate),
                           input_shape=input_shape(config, image_shape),
                           ema=config.ema_decay > 0)
  return model, learning_rate, jax.jit(init, out_shardings=sharding)(
      jax.random.PRNGKey(config.seed))


def num_classes(builder):
  return builder.info.features['label'].num_classes


def weight_loss_terms(config, params):
  """config.weight_loss as ((layer, wl), ...), each layer checked against the model."""
  terms = tuple(sorted(config.weight_loss.items()))
  for name, _ in terms:
    if name != '*' and (name not in params or 'kernel' not in params[name]):
      raise UserError(f'bad config: weight_loss names {name!r}, which is not a layer of '
                      f'{config.model} (layers: {", ".join(params)})')
  return terms


class Trainer:
  """Holds the run's data, jitted steps and state; each method one concern."""

  def __init__(self, config, for_training=True):
    config_lib.validate(config)
    self.config = config
    self.mesh = parallel.make_mesh()
    parallel.check_divisible('batch_size', config.batch_size, self.mesh)
    parallel.check_divisible('eval_batch_size', config.eval_batch_size, self.mesh)
    self.builder = data.info(config.dataset, config.data_dir, config.download)
    # Each process reads only its own part of the data.
    p, count = jax.process_index(), jax.process_count()
    self.eval_split = data.load(self.builder, data.shard(config.eval_split, p, count))
    self.eval_total = data.num_examples(self.builder, config.eval_split)
    self.train_data = data.load_train(
        self.builder, config.train_split, config.batch_size, config.input_shards or count,
        p, count) if for_training else None
    self.replicated = parallel.replicated(self.mesh)
    self.batch_sharding = parallel.batch_sharded(self.mesh)
    self.model, self.learning_rate, self.state = initial_state(
        config, num_classes(self.builder), data.num_examples(self.builder, config.train_split),
        self.eval_split.images.shape[1:], self.replicated)
    coefficients = weight_loss_terms(config, self.state.params)
    augment_cfg = config.augment.lock()
    self.train_step = jax.jit(
        functools.partial(train.train_step, augment_cfg=augment_cfg, coefficients=coefficients,
                          weight_loss_on=config.weight_loss_on, ema_decay=config.ema_decay),
        out_shardings=(self.replicated, self.replicated),
        donate_argnums=0)  # the old state's buffers become the new one's: one copy in memory
    self.eval_step = jax.jit(functools.partial(train.eval_step, augment_cfg=augment_cfg),
                             out_shardings=self.replicated)

  def describe(self):
    c = self.config
    log(f'recipe: {c.recipe or c.model}')
    log(f'model: {c.model}, {models.param_count(self.state.params):,} parameters')
    log(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
        f'({jax.process_count()} process(es))')
    log(f'kernels: {kernels.describe()}')
    num_train = data.num_examples(self.builder, c.train_split)
    log(f'data: {c.dataset} {c.train_split}={num_train:,} examples, '
        f'{c.eval_split}={self.eval_total:,} examples')

  def evaluate(self, state=None):
    """Precision @ 1 over exactly the examples of the eval split, on every device."""
    state = self.state if state is None else state
    totals = {'correct': 0, 'count': 0, 'loss_sum': 0.0}
    local_batch = self.config.eval_batch_size // jax.process_count()
    largest_part = -(-self.eval_total // jax.process_count())
    batches = data.eval_batches(self.eval_split, local_batch, -(-largest_part // local_batch))
    for batch in batches:
      sums = self.eval_step(state, parallel.put_batch(batch, self.batch_sharding))
      for k in totals:
        totals[k] += sums[k].item()
    count = totals['count']
    return {'precision': totals['correct'] / count, 'correct': totals['correct'],
            'count': count, 'loss': totals['loss_sum'] / count}

  def train_batch(self, step):
    batch = self.train_data.batch(self.config.seed, step)
    return parallel.put_batch(batch, self.batch_sharding)


# What fixes the shapes of the train state: resuming with another value fails.
STATE_FIELDS = {
    'model': lambda c: c.model,
    'dataset': lambda c: c.dataset,
    'optimizer': lambda c: c.optimizer,
    'augment.crop_size': lambda c: c.augment.crop_size,
    'ema_decay > 0': lambda c: c.get('ema_decay', 0.0) > 0,
}


def load_saved_config(workdir):
  """The config a workdir was trained with (config.json), or None."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  # Onto today's defaults, so a workdir written before a field existed still loads.
  config = config_lib.base_config()
  with config.unlocked():
    config.update(saved)
  return config


def check_resumable(config, workdir):
  """UserError if config.json in workdir has other values for STATE_FIELDS."""
  saved = load_saved_config(workdir)
  if saved is None:
    return
  for field, value in STATE_FIELDS.items():
    before, now = value(saved), value(config)
    if before != now:
      raise UserError(f'workdir {workdir} was trained with {field}={before!r}, this config has '
                      f'{field}={now!r}; use a new --workdir (or the same {field})')


def write_config(config, workdir):
  """Writes config.json atomically: a kill never leaves a half-written one."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'config.json')
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + '.tmp', path)


class StopSignals:
  """SIGTERM/SIGINT ask the loop to stop after the current step (with a checkpoint)."""

  def __init__(self):
    self.received = None

  def __enter__(self):
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config, workdir):
  """Trains config's recipe in workdir, resuming from its latest good checkpoint.

  Returns the last evaluation's result with `step`, `stopped` (the signal) where a
  signal stopped it, and the final TrainState this process holds under `state`.
  """
  prepare_workdir(workdir)
  check_resumable(config, workdir)
  trainer = Trainer(config)
  trainer.describe()
  ckpt = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  try:
    start, trainer.state = ckpt.restore_latest(trainer.state, report=log)
    if start is not None:
      log(f'resumed from the checkpoint at step {start}')
    write_config(config, workdir)
    reporter = Reporter(workdir, start or 0, config.num_train_steps, config.progress)
    try:
      with StopSignals() as stop:
        result = dict(_loop(trainer, ckpt, stop, reporter), state=trainer.state)
    finally:
      reporter.close()
  finally:
    ckpt.close()
  if jax.process_index() == 0:
    for path in plots.write(workdir):
      log(f'wrote {path}')
  return result


def evaluate_checkpoint(config, workdir, step=None):
  """--mode=eval (the seeds' has_trained=True): restore a checkpoint, evaluate, no training."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise UserError(f'no checkpoints in {workdir}: train first, or point --workdir at a run')
  trainer = Trainer(config, for_training=False)
  trainer.describe()
  ckpt = checkpoint.Checkpoints(workdir, config.keep_checkpoints, read_only=True)
  try:
    if step is None:
      step, trainer.state = ckpt.restore_latest(trainer.state, report=log)
      if step is None:
        raise UserError(f'no readable checkpoint in {ckpt_dir}')
    else:
      trainer.state = ckpt.restore_step(step, trainer.state)
  finally:
    ckpt.close()
  log(f'restored the checkpoint at step {step}')
  return _report_eval(trainer, step, Reporter())


def _loop(trainer, ckpt, stop, reporter):
  config = trainer.config
  state = trainer.state
  start = int(state.step)
  last_time, last_step = time.perf_counter(), start
  pending = None  # the previous step's metrics: checked one step late, so the device never idles
  any_process = parallel.AnyProcess(trainer.mesh)
  for step in range(start, config.num_train_steps):
    state, metrics = trainer.train_step(state, trainer.train_batch(step))
    reporter.advance()
    if pending is not None:
      _finite_loss(*pending)
    pending = (metrics, step)
    done = step + 1
    if step % config.log_every == 0:  # the seeds log steps 0, 10, 20, ...
      loss = _finite_loss(metrics, step)  # blocks: the interval's time is real compute
      now = time.perf_counter()
      sec_per_batch = (now - last_time) / (done - last_step)
      reporter.train(step, loss, float(trainer.learning_rate(step)),
                     config.batch_size / sec_per_batch, sec_per_batch,
                     float(metrics['cross_entropy']))
      last_time, last_step = now, done
    if config.eval_every and done % config.eval_every == 0 and done != config.num_train_steps:
      trainer.state = state
      _report_eval(trainer, done, reporter)
      last_time, last_step = time.perf_counter(), done  # keep eval out of examples/sec
    # Every process stops at the same step, whichever of them got the signal.
    stopping = any_process(stop.received is not None)
    if (config.checkpoint_every and done % config.checkpoint_every == 0) or stopping:
      _finite_loss(metrics, step)  # never checkpoint a diverged state
      ckpt.save(done, state)
    if stopping:
      ckpt.wait()
      received = stop.received or 'a signal to another process'
      reporter.message(f'stopped by {received} after step {done}; checkpoint written')
      trainer.state = state
      return {'step': done, 'stopped': received}
  if pending is not None:
    _finite_loss(*pending)
  trainer.state = state
  final_step = int(state.step)
  if ckpt.latest_step() != final_step:
    ckpt.save(final_step, state)
  return _report_eval(trainer, final_step, reporter)


def _finite_loss(metrics, step):
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise UserError(f'loss is {loss} at step {step}; stopped without checkpointing this state')
  return loss


def _report_eval(trainer, step, reporter):
  result = trainer.evaluate()
  reporter.eval(step, result)
  return dict(result, step=step)
