"""Checkpoints never lose work: exact resume, eval-only, signals, kill -9, corruption."""
import errno
import gc
import inspect
import json
import os
import pathlib
import re
import signal
import sys
import threading
import time
import warnings

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization

from cnnjax import checkpoint, kernels, loop, workdir as workdir_lib
from cnnjax.errors import UserError
from tests.conftest import SMALL_RUN, as_flags, assert_same_state, restore, run_py, small_config

TINY = dict(SMALL_RUN, batch_size=32, log_every=1, eval_every=0, checkpoint_every=4)


def tiny(**overrides):
  return small_config(**dict(TINY, **overrides))


def saved_state(workdir, step, config=None):
  return restore(workdir, step, config or tiny())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 8-step run: the state every interrupted run must reproduce bit for bit."""
  workdir = tmp_path_factory.mktemp('reference')
  loop.train_and_evaluate(tiny(num_train_steps=8), str(workdir))
  return saved_state(workdir, 8)


def test_resume_is_bit_exact(tmp_path, reference):
  loop.train_and_evaluate(tiny(num_train_steps=4), str(tmp_path))
  result = loop.train_and_evaluate(tiny(num_train_steps=8, log_every=3), str(tmp_path))
  assert result['step'] == 8
  assert_same_state(saved_state(tmp_path, 8), reference)


def test_eval_mode_restores_and_evaluates_without_training(tmp_path):
  trained = loop.train_and_evaluate(tiny(num_train_steps=8), str(tmp_path))
  final_state = trained.pop('state')
  assert int(final_state.step) == 8
  evaluated = loop.evaluate_checkpoint(tiny(), str(tmp_path))
  assert evaluated == trained
  at_4 = loop.evaluate_checkpoint(tiny(), str(tmp_path), step=4)
  assert at_4['step'] == 4 and at_4['count'] == 100
  with pytest.raises(UserError, match=r'no checkpoint at step 5 .*available: 4, 8'):
    loop.evaluate_checkpoint(tiny(), str(tmp_path), step=5)
  with pytest.raises(UserError, match='no checkpoints in'):
    loop.evaluate_checkpoint(tiny(), str(tmp_path / 'empty'))


def test_incompatible_config_is_refused_harmless_changes_are_not(tmp_path):
  loop.train_and_evaluate(tiny(num_train_steps=4), str(tmp_path))
  with pytest.raises(UserError, match=r'trained with augment.crop_size=24.*crop_size=28'):
    loop.train_and_evaluate(tiny(num_train_steps=8, augment=dict(crop_size=28)), str(tmp_path))
  os.remove(tmp_path / 'config.json')  # the shape check stands behind the config check
  with pytest.raises(UserError, match=r'does not fit this config .*local3/kernel'):
    loop.train_and_evaluate(tiny(num_train_steps=8, augment=dict(crop_size=28)), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']  # nothing was moved or lost
  result = loop.train_and_evaluate(tiny(num_train_steps=6, log_every=5, eval_every=3),
                                   str(tmp_path))
  assert result['step'] == 6


@pytest.mark.parametrize('field,value', [
    ('model', 'cifar_deep'), ('dataset', 'mnist'), ('optimizer', 'sgd'), ('ema_decay', 0.999)])
def test_each_field_that_fixes_the_state_is_refused_on_resume(tmp_path, field, value):
  from cnnjax import workdir as workdir_lib
  workdir_lib.write_config(tiny(), str(tmp_path))
  assert workdir_lib.check_resumable(tiny(), str(tmp_path)) == []
  name = 'ema_decay > 0' if field == 'ema_decay' else field
  with pytest.raises(UserError, match=rf'was trained with {re.escape(name)}=.*; use a new '):
    workdir_lib.check_resumable(tiny(**{field: value}), str(tmp_path))


def test_resume_with_another_data_order_says_so(tmp_path, capsys):
  from cnnjax import workdir as workdir_lib
  loop.train_and_evaluate(tiny(num_train_steps=2), str(tmp_path))
  for field in workdir_lib.ORDER_FIELDS:  # each is allowed, and named
    value = {'seed': 7, 'train_split': 'train[:128]', 'batch_size': 16, 'input_shards': 2}[field]
    notices = workdir_lib.check_resumable(tiny(**{field: value}), str(tmp_path))
    assert len(notices) == 1 and notices[0].startswith(f'{field}={value!r} (the run was '
                                                       f'trained with {tiny()[field]!r})')
  capsys.readouterr()
  loop.train_and_evaluate(tiny(num_train_steps=4, seed=7), str(tmp_path))
  out = capsys.readouterr().out
  assert re.search(r'^resumed from the checkpoint at step 2\nresumed with seed=7 \(the run was '
                   rf'trained with {tiny().seed}\): from here on the batches are not those of '
                   r'the uninterrupted run$', out, re.M), out


def test_keep_checkpoints_keeps_the_newest_that_many(tmp_path):
  config = tiny(num_train_steps=10, checkpoint_every=2, keep_checkpoints=2)
  loop.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpoints(str(tmp_path), config.keep_checkpoints, read_only=True)
  steps = ckpt.steps()
  ckpt.close()
  assert steps == list(range(10, 0, -config.checkpoint_every))[:config.keep_checkpoints][::-1]


def test_non_finite_loss_stops_without_checkpointing_it(tmp_path):
  loop.train_and_evaluate(tiny(num_train_steps=2, checkpoint_every=1, optimizer='sgd'), str(tmp_path))
  # Resumed at a rate that diverges at once, checkpointing every step.
  config = tiny(num_train_steps=50, optimizer='sgd', learning_rate=1e9, checkpoint_every=1)
  with pytest.raises(UserError, match=r'loss is (nan|inf) at step (\d+); stopped') as error:
    loop.train_and_evaluate(config, str(tmp_path))
  diverged = int(re.search(r'at step (\d+)', str(error.value)).group(1))
  ckpt = checkpoint.Checkpoints(str(tmp_path), 3, read_only=True)
  steps = ckpt.steps()
  ckpt.close()
  # Every step was a checkpoint step: the state whose loss was not finite was saved, and
  # then moved aside; what is left ends at the step before it, and is finite.
  assert steps[-1] == diverged - 1 and diverged > 2
  assert 'moved the checkpoint of that state to' in str(error.value)
  assert [p.split('-')[0] for p in os.listdir(tmp_path / 'diverged_checkpoints')] == [
      str(diverged)]
  for step in steps:
    assert all(np.isfinite(np.asarray(x)).all()
               for x in jax.tree.leaves(saved_state(tmp_path, step, config).params))


def train_8_steps_and_truncate_the_last_checkpoint(workdir):
  loop.train_and_evaluate(tiny(num_train_steps=8), str(workdir))
  files = [p for p in (workdir / 'checkpoints' / '8').rglob('*') if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])


def test_corrupt_latest_checkpoint_is_moved_aside_by_training_and_the_previous_used(
    tmp_path, reference):
  train_8_steps_and_truncate_the_last_checkpoint(tmp_path)
  trainer = loop.Trainer(tiny(), for_training=False)
  # Read-only (eval, predict: perhaps beside the run that owns the folder): used, not moved.
  for read_only, done in ((True, 'left it in place'), (False, 'moved it to')):
    messages = []
    ckpt = checkpoint.Checkpoints(str(tmp_path), 3, read_only=read_only)
    step, _ = ckpt.restore_latest(trainer.state, report=messages.append)
    ckpt.close()
    assert step == 4
    assert len(messages) == 1 and 'checkpoint at step 8 is unreadable' in messages[0]
    # TensorStore's reason, naming the array it could not read; not orbax's wrapper (a spec).
    assert re.search(r'unreadable \(ValueError: [A-Z_]+: Error reading "[\w./]+": \w',
                     messages[0]), messages[0]
    assert 'TensorStore' not in messages[0]
    assert str(tmp_path / 'checkpoints') not in messages[0]  # said once already: step 8
    assert done in messages[0]
    assert os.path.isdir(tmp_path / 'checkpoints' / '8') == read_only
  assert len(os.listdir(tmp_path / 'corrupt_checkpoints')) == 1
  loop.train_and_evaluate(tiny(num_train_steps=8), str(tmp_path))  # redoes steps 5-8
  assert_same_state(saved_state(tmp_path, 8), reference)


def test_the_reads_a_corrupt_checkpoint_leaves_behind_print_no_tracebacks(tmp_path,
                                                                         monkeypatch):
  """Orbax closes its event loop once one read of the checkpoint fails; tensorstore's other
  reads, finishing after, each hit the closed loop ('Event loop is closed'), which Python
  printed as a traceback: over a dozen of them in one resume through run.py; and orbax's
  coroutines left unfinished raise when collected, or are warned of if never started. Those
  are dropped; any other unraisable error or warning still reaches the user."""
  train_8_steps_and_truncate_the_last_checkpoint(tmp_path)
  reached = []
  monkeypatch.setattr(sys, 'unraisablehook', reached.append)
  trainer = loop.Trainer(tiny(), for_training=False)
  with warnings.catch_warnings(record=True) as warned:
    warnings.simplefilter('always')
    for _ in range(5):  # before the mend: 5 to 16 reports a restore on the Zen 5
      ckpt = checkpoint.Checkpoints(str(tmp_path), 3, read_only=True)
      assert ckpt.restore_latest(trainer.state, report=lambda message: None)[0] == 4
      ckpt.close()
    time.sleep(1)  # the abandoned reads finish
    gc.collect()  # and orbax's coroutines that awaited them are collected
    # Seen once in CI: a read coroutine of orbax's that its closed loop never started, which
    # Python warns of when it is collected (made here to be sure of one).
    read = serialization._read_array_index_and_device_put
    read(**dict.fromkeys(inspect.signature(read).parameters))
    async def not_orbax():
      pass
    not_orbax()
    gc.collect()
  assert reached == []
  assert [str(w.message) for w in warned] == [
      f"coroutine '{not_orbax.__qualname__}' was never awaited"]

  class Unraisable:
    def __del__(self):
      raise ValueError('not a read of a closed loop')
  Unraisable()
  assert [type(u.exc_value) for u in reached] == [ValueError]


def test_a_full_disk_stops_the_run_in_one_line_keeping_the_last_checkpoint(tmp_path, reference,
                                                                           monkeypatch):
  loop.train_and_evaluate(tiny(num_train_steps=4), str(tmp_path))
  real_disk_usage = checkpoint.shutil.disk_usage
  almost_full = lambda path: real_disk_usage(path)._replace(free=500_000)
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage', almost_full)
  size = sum(x.nbytes for x in jax.tree.leaves(saved_state(tmp_path, 4)))
  expected = (f'cannot write a checkpoint in {tmp_path / "checkpoints"} (no room: it takes about '
              f'{(size + checkpoint.SAVE_MARGIN_BYTES) / 2**20:,.0f} MiB, 0 MiB are free); the '
              'latest one written is step 4: make room and re-run to resume from it')
  with pytest.raises(UserError) as error:
    loop.train_and_evaluate(tiny(num_train_steps=8), str(tmp_path))
  assert str(error.value) == expected
  # Where orbax itself fails (the disk filled meanwhile), the OS error it names is said.
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage', real_disk_usage)
  def failing_save(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database: Failed to '
                     "write 3022848 bytes to file 9: No space left on device [os_error_code='28']")
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', failing_save)
  with pytest.raises(UserError) as error:
    loop.train_and_evaluate(tiny(num_train_steps=8), str(tmp_path))
  assert str(error.value) == expected.replace(
      expected[expected.index('(') + 1:expected.index(')')], 'No space left on device')
  monkeypatch.undo()
  assert os.listdir(tmp_path / 'checkpoints') == ['4']
  loop.train_and_evaluate(tiny(num_train_steps=8), str(tmp_path))  # resumes at 4, room again
  assert_same_state(saved_state(tmp_path, 8), reference)


class FullDisk:
  """metrics.jsonl once the disk is full: writes fail, and so does the close that flushes them."""

  def __init__(self, file):
    self.file, self.name = file, file.name

  def write(self, text):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def flush(self):
    pass

  def close(self):
    self.file.close()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_under_the_metrics_stops_the_run_in_one_line(tmp_path, monkeypatch):
  loop.train_and_evaluate(tiny(num_train_steps=4), str(tmp_path))
  written = (tmp_path / 'metrics.jsonl').read_text()
  opened = loop.Reporter._open_history
  def then_full(reporter, *args):
    opened(reporter, *args)
    reporter._file = FullDisk(reporter._file)
  monkeypatch.setattr(loop.Reporter, '_open_history', then_full)
  with pytest.raises(UserError) as error:  # not the OSError of the close after it
    loop.train_and_evaluate(tiny(num_train_steps=8), str(tmp_path))
  assert str(error.value) == (
      f'cannot write the metrics in {tmp_path} (No space left on device); what is written '
      'stays: make room and re-run to resume from the latest checkpoint')
  assert (tmp_path / 'metrics.jsonl').read_text() == written
  assert os.listdir(tmp_path / 'checkpoints') == ['4']


def test_a_workdir_that_cannot_be_locked_is_said_and_still_trained_in(tmp_path, monkeypatch,
                                                                      capsys):
  def no_locks(file, operation):  # as flock fails on a file system without locks
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(workdir_lib.fcntl, 'flock', no_locks)
  loop.train_and_evaluate(tiny(num_train_steps=1), str(tmp_path))
  out = capsys.readouterr().out
  assert out.startswith(f'workdir {tmp_path} cannot be locked (No locks available): nothing '
                        'stops a second run started on it meanwhile\n')
  assert re.search(r'^step 1: precision @ 1', out, re.M)


# --- as a user's process experiences it ---------------------------------------------

def start(workdir, *args, env=None):
  return run_py('--workdir', str(workdir), *as_flags(TINY), *args, env=env, wait=False)


def wait_for_line(proc, pattern, timeout=300):
  """The first stdout line matching `pattern`; the process is killed after `timeout` s."""
  timer = threading.Timer(timeout, proc.kill)
  timer.start()
  try:
    for line in proc.stdout:
      if re.match(pattern, line):
        return line
  finally:
    timer.cancel()
  raise AssertionError(f'no line matching {pattern!r} (ended, or killed after {timeout} s): '
                       f'{proc.stderr.read()[-2000:]}')


def test_ctrl_c_outside_the_training_steps_is_one_line_exit_130_and_leaves_no_temp_files(
    tmp_path):
  loop.train_and_evaluate(tiny(num_train_steps=1), str(tmp_path))
  temp = tmp_path / 'temp'  # the run's temp folder: it ends at once (run.py's leave), no
  temp.mkdir()  # atexit handler runs, and what one would delete stays (autograph's files)
  # Evaluation runs outside the steps' signal handling. Of the whole train split: ~7 s after
  # the line below on a 2-core Zen 5, where the test split's took under 2 s (its process gone
  # in 3) and once, in CI, ended before the signal came.
  # SIGINT as a terminal's foreground process has it: a process started with it ignored (a
  # script's background job, and so this suite run with `&`) keeps it ignored, as it should.
  # A child inherits an ignored signal, and a handled one as the default (no preexec_fn: it
  # would fork this multithreaded process).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    proc = run_py('--mode=eval', '--workdir', str(tmp_path), '--config.eval_split=train',
                  config=None, env={'TMPDIR': str(temp)}, wait=False)
  finally:
    signal.signal(signal.SIGINT, previous)
  wait_for_line(proc, r'restored the checkpoint at step 1')  # compiling and evaluating follow
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert (proc.returncode, err) == (130, 'stopped by SIGINT\n'), out[-300:]
  assert 'precision' not in out
  assert sorted(p.name for p in temp.iterdir()) == []


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_exits_0(tmp_path, sig):
  proc = start(tmp_path / 'run', '--config.num_train_steps=100000', '--config.checkpoint_every=0')
  wait_for_line(proc, r'step 3, loss')
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  stopped = re.search(rf'stopped by {sig.name} after step (\d+); checkpoint written', out)
  assert stopped, out
  step = int(stopped.group(1))
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == [str(step)]
  # The same command resumes from that checkpoint and ends as an uninterrupted run.
  end = f'--config.num_train_steps={step + 2}'
  resumed = start(tmp_path / 'run', end, '--config.checkpoint_every=0')
  whole = start(tmp_path / 'whole', end, '--config.checkpoint_every=0')
  outputs = [proc.communicate(timeout=300) for proc in (resumed, whole)]
  assert [proc.returncode for proc in (resumed, whole)] == [0, 0], outputs
  assert f'resumed from the checkpoint at step {step}' in outputs[0][0]
  assert_same_state(saved_state(tmp_path / 'run', step + 2),
                    saved_state(tmp_path / 'whole', step + 2))


@pytest.mark.skipif(not kernels.available() or os.environ.get('CNNJAX_CPU_KERNELS', 'auto')
                    != 'auto', reason='only CNNJAX_CPU_KERNELS=auto with oneDNN measures choices')
def test_a_resume_whose_cache_chose_other_kernels_computes_as_the_run_did(tmp_path, reference):
  # A resume on a fresh machine of the same kind (a preempted VM's successor) measures the CPU
  # kernels again, and a near tie may time the other way: here every measured choice in its
  # cache is the other path. The run's own record of its choices, in its workdir, comes first.
  loop.train_and_evaluate(tiny(num_train_steps=4), str(tmp_path / 'run'))
  record = json.loads((tmp_path / 'run' / workdir_lib.KERNEL_CHOICES).read_text())
  other = {machine: {op: dict(entry, path='xla' if entry['path'] == 'onednn' else 'onednn')
                     for op, entry in ops.items()} for machine, ops in record.items()}
  assert sum(map(len, other.values())) >= 3  # Recipe A's convolutions and pools at least
  (tmp_path / 'cache.json').write_text(json.dumps(other))
  resumed = start(tmp_path / 'run', '--config.num_train_steps=8',
                  env={'CNNJAX_KERNEL_CACHE': str(tmp_path / 'cache.json')})
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  assert "the run's own" in out and 'measured now' not in out
  assert_same_state(saved_state(tmp_path / 'run', 8), reference)


def test_kill_9_at_any_moment_never_breaks_the_next_run(tmp_path, reference):
  # Checkpoint every step, so most kills land during an asynchronous save.
  interrupted_saves = 0
  for after_step, delay in ((1, 0.0), (3, 0.05), (5, 0.15)):
    proc = start(tmp_path, '--config.num_train_steps=8', '--config.checkpoint_every=1')
    wait_for_line(proc, rf'step {after_step}, loss')
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    interrupted_saves += any('tmp' in p.name for p in (tmp_path / 'checkpoints').iterdir())
  assert interrupted_saves  # at least one kill landed during a save
  finish = start(tmp_path, '--config.num_train_steps=8', '--config.checkpoint_every=1')
  out, err = finish.communicate(timeout=300)
  assert finish.returncode == 0, err
  assert re.search(r'^step 8: precision @ 1', out, re.M)
  assert_same_state(saved_state(tmp_path, 8), reference)
  leftovers = [p.name for p in pathlib.Path(tmp_path / 'checkpoints').iterdir()
               if 'tmp' in p.name]
  assert leftovers == []  # interrupted saves were cleaned up
