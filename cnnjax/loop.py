"""The imperative shell: load data, build the state, run the loop, log, checkpoint.

train_and_evaluate(config, workdir) is what `python run.py` calls.
"""
import os
import signal
import time

import jax
import numpy as np

from cnnjax import (checkpoint, config as config_lib, data, kernels, models, parallel, plots,
                    state as state_lib, workdir as workdir_lib)
from cnnjax.errors import UserError
from cnnjax.report import Reporter, log


def num_classes(builder):
  return builder.info.features['label'].num_classes


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
    args = (config, num_classes(self.builder), data.num_examples(self.builder, config.train_split),
            self.eval_split.images.shape[1:], self.replicated)
    if for_training:
      self.model, self.learning_rate, self.state = state_lib.initial_state(*args)
    else:  # a checkpoint will fill it: its shapes and shardings are enough, nothing computed
      self.state = state_lib.abstract_state(*args)
    self.train_step = state_lib.jit_train_step(config, self.state.params, self.replicated)
    self.eval_step = state_lib.jit_eval_step(config, self.replicated)

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

  def evaluate(self, state):
    """Precision @ 1 over exactly the examples of the eval split, on every device."""
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
  workdir_lib.prepare(workdir)
  workdir_lib.check_resumable(config, workdir)
  trainer = Trainer(config)
  trainer.describe()
  ckpt = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  try:
    start, state = ckpt.restore_latest(trainer.state, report=log)
    if start is not None:
      log(f'resumed from the checkpoint at step {start}')
    workdir_lib.write_config(config, workdir)
    reporter = Reporter(workdir, start or 0, config.num_train_steps, config.progress)
    try:
      with StopSignals() as stop:
        state, result = _loop(trainer, state, ckpt, stop, reporter)
    finally:
      reporter.close()
  finally:
    ckpt.close()
  if jax.process_index() == 0:
    for path in plots.write(workdir):
      log(f'wrote {path}')
  return dict(result, state=state)


def evaluate_checkpoint(config, workdir, step=None):
  """--mode=eval (the seeds' has_trained=True): restore a checkpoint, evaluate, no training."""
  ckpt_dir = workdir_lib.checkpoints_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise UserError(f'no checkpoints in {workdir}: train first, or point --workdir at a run')
  trainer = Trainer(config, for_training=False)
  trainer.describe()
  ckpt = checkpoint.Checkpoints(workdir, config.keep_checkpoints, read_only=True)
  try:
    if step is None:
      step, state = ckpt.restore_latest(trainer.state, report=log)
      if step is None:
        raise UserError(f'no readable checkpoint in {ckpt_dir}')
    else:
      state = ckpt.restore_step(step, trainer.state)
  finally:
    ckpt.close()
  log(f'restored the checkpoint at step {step}')
  return _report_eval(trainer, state, step, Reporter())


def _loop(trainer, state, ckpt, stop, reporter):
  """Trains from `state` to config.num_train_steps or a stop; returns (state, result)."""
  config = trainer.config
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
      _report_eval(trainer, state, done, reporter)
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
      return state, {'step': done, 'stopped': received}
  if pending is not None:
    _finite_loss(*pending)
  final_step = int(state.step)
  if ckpt.latest_step() != final_step:
    ckpt.save(final_step, state)
  return state, _report_eval(trainer, state, final_step, reporter)


def _finite_loss(metrics, step):
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise UserError(f'loss is {loss} at step {step}; stopped without checkpointing this state')
  return loss


def _report_eval(trainer, state, step, reporter):
  result = trainer.evaluate(state)
  reporter.eval(step, result)
  return dict(result, step=step)
