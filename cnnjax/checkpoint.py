"""Checkpoints in the workdir through an orbax CheckpointManager.

The saved state is the whole TrainState (params, optimizer state, step, base
PRNG key); the input position is a function of the step (data.TrainShards.batch), so
restoring the state restores the whole run, bit for bit.

Orbax writes each save to a temporary directory and renames it when complete,
so a process killed mid-save leaves only a `*.orbax-checkpoint-tmp-*` folder,
which latest_step() ignores and cleanup_tmp_directories removes. A checkpoint
that is complete but unreadable (a truncated file, a bad disk) is moved to
`workdir/corrupt_checkpoints/` and the previous one is used, said in one line (without the
tracebacks of the reads orbax abandons); one of a state whose loss was not finite, to
`workdir/diverged_checkpoints/` (loop.py). A disk without room for
the next save stops the run before the save starts (a UserError naming the latest one).
"""
import contextlib
import inspect
import os
import re
import shutil
import sys
import time
import warnings

import flax.serialization
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cnnjax import workdir as workdir_lib
from cnnjax.errors import UserError, typed_line


class Checkpoints:

  def __init__(self, workdir, keep, read_only=False):
    self.workdir = workdir
    self.read_only = read_only
    self.directory = os.path.abspath(workdir_lib.checkpoints_dir(workdir))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(keep),
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=True,
        read_only=read_only,
        create=not read_only)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler()})  # for item_metadata

  def steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state):
    """Starts an asynchronous save; training continues while it writes. A disk without room
    for it is a UserError before it starts; a save that failed all the same is one here, at
    the next save, or in wait() or close()."""
    with self._failed_saves_said():
      # Orbax would start the save, fail in its writer threads and print their tracebacks.
      # (The previous save, long since written, is waited for first: it may hold the room.)
      self._manager.wait_until_finished()
      size, free = _nbytes(state), shutil.disk_usage(self.directory).free
      if free < size + SAVE_MARGIN_BYTES:
        raise _NoRoom(f'it takes about {_mib(size + SAVE_MARGIN_BYTES)}, {_mib(free)} are '
                      'free')
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  def wait(self):
    """Returns once every save started is written; a UserError if one failed."""
    with self._failed_saves_said():
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _failed_saves_said(self):
    try:
      yield
    except Exception as e:
      latest = self.latest_step()
      raise UserError(
          f'cannot write a checkpoint in {self.directory} ({_write_failure(e)}); the latest '
          'one written is ' + (f'step {latest}: make room and re-run to resume from it'
                               if latest is not None else 'none: make room and re-run')) \
          from None

  def restore(self, step, like):
    """The state saved at `step`, placed with the shardings of `like`."""
    _drop_reports_of_abandoned_reads()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored['state']

  def check_fits(self, step, like):
    """UserError if the checkpoint's arrays differ in path or shape from `like`'s.

    Reads only metadata, so a checkpoint of another model is reported as such
    instead of failing deep inside orbax (or being mistaken for a corrupt one).
    """
    _drop_reports_of_abandoned_reads()
    saved = _shapes(self._manager.item_metadata(step)['state'].tree)
    wanted = _shapes(flax.serialization.to_state_dict(like))
    if saved != wanted:
      diff = sorted(set(saved.items()) ^ set(wanted.items()))[0][0]
      raise UserError(f'the checkpoint at step {step} in {self.directory} does not fit this '
                      f'config (first difference: {diff}, saved {saved.get(diff)}, now '
                      f'{wanted.get(diff)}); use a new --workdir for a different model')

  def restore_step(self, step, like):
    """restore(), with a one-line UserError for a missing step or unreadable checkpoint."""
    if step not in self.steps():
      available = ', '.join(map(str, self.steps())) or 'none'
      raise UserError(f'no checkpoint at step {step} in {self.directory} (available: {available})')
    try:
      self.check_fits(step, like)
      return self.restore(step, like)
    except UserError:
      raise
    except Exception as e:
      raise UserError(f'checkpoint at step {step} cannot be restored: {_reason(e)}') from None

  def restore_latest(self, like, report):
    """(step, state) from the newest readable checkpoint, or (None, like) if none.

    Unreadable ones are reported through `report` and moved aside, never deleted; read-only
    (eval, predict: perhaps beside the training run that owns the folder) leaves them be.
    """
    for step in reversed(self.steps()):
      try:
        self.check_fits(step, like)
        return step, self.restore(step, like)
      except UserError:
        raise  # a readable checkpoint of another model: the user's mistake, not corruption
      except Exception as e:
        done = ('left it in place (only training moves checkpoints)' if self.read_only
                else f'moved it to {self._quarantine(step)}')
        report(f'checkpoint at step {step} is unreadable ({_reason(e)}); {done} and trying '
               'the previous one')
    return None, like

  def set_aside(self, from_step, folder):
    """Moves the checkpoints of `from_step` and later to workdir/folder (never deletes);
    returns where they went."""
    self.wait()
    return [self._quarantine(step, folder) for step in self.steps() if step >= from_step]

  def _quarantine(self, step, folder='corrupt_checkpoints'):
    target = os.path.join(self.workdir, folder, f'{step}-{int(time.time())}')
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def close(self):
    try:
      self.wait()
    except UserError:
      with contextlib.suppress(Exception):  # the same failure, said once
        self._manager.close()
      raise
    self._manager.close()


def _drop_reports_of_abandoned_reads():
  """Keeps a failed restore to its one line.

  Called before each read of a checkpoint. Orbax runs a restore in an event loop of its own
  and closes that loop as soon as one read fails, with tensorstore's other reads still in
  flight and orbax's coroutines that await them unfinished. Each read that finishes later
  calls the closed loop's call_soon_threadsafe from tensorstore's thread (RuntimeError('Event
  loop is closed')), and each coroutine, closed when collected, raises orbax's 'Encountered
  error while reading array index': Python prints every one as an unraisable exception, a
  dozen tracebacks or more under the one line that says the checkpoint is unreadable. Nothing
  waits for those reads. This chains a sys.unraisablehook (once) that drops exactly those
  reports and passes every other to the hook that was there; before the read, not after its
  failure, because the first reports can come while orbax's exception is on its way to us.
  Also ignored: Python's warning that one of orbax's coroutines was never awaited (one made
  but not started when its loop closed; seen once).
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_abandoned_reads', False):
    return

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
  names = '|'.join(map(re.escape, _orbax_coroutine_names()))
  warnings.filterwarnings('ignore', f"coroutine '({names})' was never awaited", RuntimeWarning)


_ORBAX_CODE = os.path.dirname(ocp.__file__)


def _orbax_coroutine_names():
  """The qualified names of the coroutine functions (and methods) orbax's modules define."""
  names = set()
  for module_name, module in list(sys.modules.items()):
    if module is None or not module_name.startswith('orbax.'):
      continue
    for value in list(vars(module).values()):
      for f in list(vars(value).values()) if inspect.isclass(value) else [value]:
        if inspect.iscoroutinefunction(f) and getattr(f, '__module__', None) == module_name:
          names.add(f.__qualname__)
  return sorted(names)


def _is_abandoned_read(unraisable):
  """Whether an unraisable exception is one of those a failed restore leaves behind."""
  if inspect.iscoroutine(unraisable.object):  # an unfinished coroutine of orbax's, collected
    return unraisable.object.cr_code.co_filename.startswith(_ORBAX_CODE)
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed'):
    return False
  tb = unraisable.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == 'call_soon_threadsafe':
      return True
    tb = tb.tb_next
  return False


def _shapes(tree, prefix=''):
  """{'params/conv1/kernel': (5, 5, 3, 64), ...} for nested dicts/lists of arrays."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = ((str(i), v) for i, v in enumerate(tree))
  else:
    return {prefix: tuple(tree.shape)} if hasattr(tree, 'shape') else {}
  out = {}
  for key, value in items:
    out.update(_shapes(value, f'{prefix}/{key}' if prefix else str(key)))
  return out


class _NoRoom(Exception):
  """The disk has no room for the next checkpoint (said before orbax starts it)."""


# Room beyond the arrays' bytes that a save needs: orbax's metadata and OCDBT's index files.
SAVE_MARGIN_BYTES = 1 << 20


def _nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, 'nbytes'))


def _mib(n):
  return f'{n / 2**20:,.0f} MiB'


def _write_failure(e):
  """Why a save failed, in words: the OS error where orbax or TensorStore name one."""
  if isinstance(e, _NoRoom):
    return f'no room: {e}'
  code = getattr(e, 'errno', None) or next(
      (int(c) for c in re.findall(r"os_error_code='(\d+)'", str(e))), None)
  return os.strerror(code) if code else _reason(e)


def _reason(e):
  """Why orbax failed, in one line: the innermost error of the chain (orbax wraps TensorStore's,
  which names the array and what is wrong with its bytes), without the spec or the checkpoint's
  own folder that TensorStore adds to it (orbax's wrapper is a whole spec, one line of it the
  repr of a bound method)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = re.sub(r'\s*\[tensorstore_spec=.*', '', typed_line(e))
  text = re.sub(r' in OCDBT database at local file "[^"]*"', '', text)
  return text if len(text) <= 300 else text[:297] + '...'
