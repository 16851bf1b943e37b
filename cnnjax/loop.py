"""The imperative shell: load data, build the state, run the loop, log, checkpoint.

train_and_evaluate(config, workdir) is what `python run.py` calls.
"""
import os
import signal
import time

import jax
import numpy as np

from cnnjax import (checkpoint, config as config_lib, data, feed, kernel_choice, kernels, models,
                    parallel, plots, state as state_lib, train, workdir as workdir_lib)
from cnnjax.errors import UserError
from cnnjax.report import Reporter, log


class Trainer:
  """Holds the run's data, jitted steps and state; each method one concern."""

  def __init__(self, config, for_training=True):
    config_lib.validate(config)  # before reading any data
    self.config = config
    self.mesh = parallel.make_mesh()
    self.source = data.info(config.dataset, config.data_dir, config.download)
    fit_images = None  # the whitening layer's data, fitted in the initial state
    if for_training and config.whiten.layer:
      fit_images = self.source.load(config.train_split, limit=config.whiten.images).images
    self.run = state_lib.build(config, state_lib.DataSpec.of(self.source, config.train_split),
                               self.mesh, initial=for_training, fit_images=fit_images)
    self.state, self.eval_accumulate = self.run.state, self.run.eval_accumulate
    self.replicated, self.batch_sharding = self.run.replicated, self.run.batch_sharded
    # Each process reads only its own part of the data.
    p, count = jax.process_index(), jax.process_count()
    self.eval_split = self.source.load(self.source.shard(config.eval_split, p, count))
    self.eval_total = self.source.num_examples(config.eval_split)
    self.train_data = self.feed = None  # restoring a checkpoint: the state's shapes suffice
    if for_training:
      self.train_data = data.load_train(self.source, config.train_split, config.batch_size,
                                        config.input_shards or count, p, count)
      self.feed = feed.make(config.data_on_device, self.train_data, config.seed, self.mesh)
      self.train_steps = self.run.train_steps(self.feed.fetch)

  def describe(self):
    c = self.config
    log(f'recipe: {c.recipe or c.model}')
    log(f'model: {c.model}, {models.param_count(self.state.params):,} parameters')
    log(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
        f'({jax.process_count()} process(es))')
    self.trace_steps()
    log(f'kernels: {kernels.describe()}')
    num_train = self.source.num_examples(c.train_split)
    log(f'data: {self.source.name} {c.train_split}={num_train:,} examples, '
        f'{c.eval_split}={self.eval_total:,} examples')
    if self.feed:
      log(f'input: {self.feed.description}; {c.steps_per_dispatch} step(s) per dispatch')

  def trace_steps(self):
    """Traces the jitted steps without running them (jax.eval_shape). The CPU kernels are
    chosen per op and shape when a step is first traced (cnnjax/kernel_choice.py): here,
    so that describe() can list them before the run starts."""
    if self.feed:
      jax.eval_shape(self.train_steps, self.state, self.feed.inputs(0, 1), self.feed.data)
    batch = next(data.eval_batches(self.eval_split,
                                   self.config.eval_batch_size // jax.process_count(), 1))
    jax.eval_shape(self.eval_accumulate, train.eval_totals_zero(), self.state,
                   parallel.put_batch(batch, self.batch_sharding))

  def evaluate(self, state):
    """Precision @ 1 over exactly the examples of the eval split, on every device. The
    counts add up on the devices and are read once, at the end: between batches nothing
    waits for the device (a device-to-host read there is an error)."""
    local_batch = self.config.eval_batch_size // jax.process_count()
    largest_part = -(-self.eval_total // jax.process_count())
    batches = data.eval_batches(self.eval_split, local_batch, -(-largest_part // local_batch))
    totals = jax.device_put(train.eval_totals_zero(), self.replicated)
    with jax.transfer_guard_device_to_host('disallow'):
      for batch in batches:
        totals = self.eval_accumulate(totals, state,
                                      parallel.put_batch(batch, self.batch_sharding))
    totals = jax.device_get(totals)
    correct, count = int(totals['correct']), int(totals['count'])
    return {'precision': correct / count, 'correct': correct, 'count': count,
            'loss': float(totals['loss_sum']) / count}

  def train(self, state, start, end, inputs=None):
    """Train steps start..end-1 in one dispatch (asynchronous): (state, each step's
    metrics stacked). `inputs`: the feed's inputs for those steps, if already sent."""
    if inputs is None:
      inputs = self.feed.inputs(start, end)
    return self.train_steps(state, inputs, self.feed.data)


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
  with workdir_lib.held(workdir):  # before anything in it is read or written
    # The CPU kernels this run chose, kept with it: a resume computes as it did.
    with kernel_choice.recorded_in(workdir_lib.kernel_choices(workdir)):
      return _train_in(config, workdir)


def _train_in(config, workdir):
  changed_order = workdir_lib.check_resumable(config, workdir)
  trainer = Trainer(config)
  trainer.describe()
  ckpt = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  try:
    start, state = ckpt.restore_latest(trainer.state, report=log)
    if start is not None:
      log(f'resumed from the checkpoint at step {start}')
      for notice in changed_order:
        log(f'resumed with {notice}')
      if start >= config.num_train_steps:
        log(f'nothing to train: the checkpoint at step {start} is at or past num_train_steps='
            f'{config.num_train_steps}; evaluating it (a larger --config.num_train_steps '
            f'trains on)')
    workdir_lib.write_config(config, workdir)
    workdir_lib.write_dataset(config, trainer.source, workdir)
    reporter = Reporter(workdir, start or 0, config.num_train_steps, config.progress)
    try:
      with StopSignals() as stop:
        state, result = _loop(trainer, state, ckpt, stop, reporter)
    except Diverged as e:
      # The loss of state s is known only after state s is saved, when s is a checkpoint
      # step: such a checkpoint goes aside, so a resume starts from a state that trained.
      moved = ckpt.set_aside(e.step, 'diverged_checkpoints')
      raise UserError(f'{e}; stopped' + (f', and moved the checkpoint of that state to '
                                         f'{moved[0]}' if moved else
                                         ' without checkpointing this state')) from None
    finally:
      reporter.close()
  finally:
    ckpt.close()
  if jax.process_index() == 0:
    try:
      for path in plots.write(workdir):
        log(f'wrote {path}')
    except UserError as e:  # the run itself is done and saved
      log(f'no plots: {e}')
  return dict(result, state=state)


def evaluate_checkpoint(config, workdir, step=None):
  """--mode=eval (the seeds' has_trained=True): restore a checkpoint, evaluate, no training."""
  ckpt_dir = workdir_lib.checkpoints_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise UserError(f'no checkpoints in {workdir}: train first, or point --workdir at a run')
  # The run's CPU kernel choices (read only): its evaluations' arithmetic.
  with kernel_choice.recorded_in(workdir_lib.kernel_choices(workdir), write=False):
    return _evaluate_in(config, workdir, ckpt_dir, step)


def _evaluate_in(config, workdir, ckpt_dir, step):
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


def group_end(step, config):
  """Where the dispatch group starting at `step` ends: steps_per_dispatch (K) steps from a
  multiple of K, unless an evaluation, a checkpoint or the last step comes first; then
  one step. So those happen at exactly their steps whatever K is, and only two group
  lengths, K and 1, are ever compiled."""
  k = config.steps_per_dispatch
  end = step + k
  boundaries = [(step // every + 1) * every for every in (config.eval_every,
                                                          config.checkpoint_every) if every]
  if step % k or end > config.num_train_steps or any(b < end for b in boundaries):
    return step + 1
  return end


class Diverged(UserError):
  """The loss of the state after `step` steps is not finite."""

  def __init__(self, step, loss):
    super().__init__(f'loss is {loss} at step {step}')
    self.step = step


class _Metrics:
  """Reads each group's per-step metrics one group late (the device never waits for the
  host): checks every step's loss is finite and writes the log lines of its steps."""

  def __init__(self, trainer, reporter, step):
    self.trainer, self.reporter = trainer, reporter
    self.pending = None
    self.restart_clock(step)

  def restart_clock(self, step):  # examples/sec counts from here (e.g. after an evaluation)
    self.last_time, self.last_step = time.perf_counter(), step

  def add(self, start, end, metrics):
    self.flush()
    self.pending = (start, end, metrics)

  def flush(self):
    if self.pending is None:
      return
    (start, end, metrics), self.pending = self.pending, None
    losses = np.asarray(metrics['loss'])  # blocks until the group is done: its time is real
    now = time.perf_counter()
    for offset in np.flatnonzero(~np.isfinite(losses))[:1]:
      raise Diverged(start + offset, losses[offset])
    config = self.trainer.config
    logged = [s for s in range(start, end) if s % config.log_every == 0]  # steps 0, 10, 20...
    if not logged:
      return
    sec_per_batch = (now - self.last_time) / (end - self.last_step)
    # From the group's own outputs: a computation of the host's (a schedule evaluated
    # here) would queue behind the group running now, and the host would wait for it.
    cross_entropy, rate = (np.asarray(metrics[k]) for k in ('cross_entropy', 'learning_rate'))
    for s in logged:
      self.reporter.train(s, float(losses[s - start]), float(rate[s - start]),
                          config.batch_size / sec_per_batch, sec_per_batch,
                          float(cross_entropy[s - start]))
    self.restart_clock(end)


def _loop(trainer, state, ckpt, stop, reporter):
  """Trains from `state` to config.num_train_steps or a stop; returns (state, result).

  Steps run in groups of up to steps_per_dispatch (group_end); while a group runs,
  the next group's inputs go to the devices and the previous group's metrics are read.
  """
  config = trainer.config
  step = int(state.step)
  metrics = _Metrics(trainer, reporter, step)
  any_process = parallel.AnyProcess(trainer.mesh)
  inputs = None
  while step < config.num_train_steps:
    end = group_end(step, config)
    state, group_metrics = trainer.train(state, step, end, inputs)
    reporter.advance(end - step)
    inputs = (trainer.feed.inputs(end, group_end(end, config))
              if end < config.num_train_steps else None)
    metrics.add(step, end, group_metrics)
    step = end
    # Every process stops at the same step, whichever of them got the signal.
    stopping = any_process(stop.received is not None)
    evaluating = config.eval_every and step % config.eval_every == 0 and (
        step != config.num_train_steps)
    saving = (config.checkpoint_every and step % config.checkpoint_every == 0) or stopping
    if evaluating or saving:
      metrics.flush()  # never evaluate or checkpoint a diverged state
    if evaluating:
      _report_eval(trainer, state, step, reporter)
      metrics.restart_clock(step)  # keep evaluation out of examples/sec
    if saving:
      ckpt.save(step, state)
    if stopping:
      ckpt.wait()
      received = stop.received or 'a signal to another process'
      reporter.message(f'stopped by {received} after step {step}; checkpoint written')
      return state, {'step': step, 'stopped': received}
  metrics.flush()
  final_step = int(state.step)
  if ckpt.latest_step() != final_step:
    ckpt.save(final_step, state)
  return state, _report_eval(trainer, state, final_step, reporter)


def _report_eval(trainer, state, step, reporter):
  result = trainer.evaluate(state)
  reporter.eval(step, result)
  return dict(result, step=step)
