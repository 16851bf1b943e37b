"""A run's workdir and the files in it: config.json, dataset.json, the checkpoints directory,
the lock that keeps a second run out, the check that a config can resume what is there.
(metrics.jsonl: report.py; kernel_choices.json: kernel_choice.py.)
"""
import contextlib
import fcntl
import json
import os
import socket

import jax

from cnnjax import config as config_lib, report
from cnnjax.errors import UserError, first_line

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'  # what predict needs of the run's dataset
CHECKPOINTS = 'checkpoints'
LOCK_FILE = '.lock'
KERNEL_CHOICES = 'kernel_choices.json'  # the run's own CPU kernel choices (kernel_choice.py)


def checkpoints_dir(workdir):
  return os.path.join(workdir, CHECKPOINTS)


def kernel_choices(workdir):
  return os.path.join(workdir, KERNEL_CHOICES)


def make_writable(folder, what):
  """Makes folder (and its parents) and proves this process can write in it, so that a bad
  path fails before any work; else one UserError: '<what> is not writable: <why>'."""
  try:
    os.makedirs(folder, exist_ok=True)
    # A probe of this process's own: processes sharing the workdir start at the same instant.
    probe = os.path.join(folder, f'.write-test-{jax.process_index()}-{os.getpid()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f'{what} is not writable: {_blocking_file(folder) or e.strerror or e}') \
        from None


def _blocking_file(folder):
  """'<path> is a file' for the file where folder's path needs a directory, else None."""
  path = os.path.abspath(folder)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return f'{path} is a file' if os.path.isfile(path) else None


def prepare(workdir):
  make_writable(workdir, f'workdir {workdir!r}')


@contextlib.contextmanager
def held(workdir):
  """Holds workdir for one training run: another run started on it meanwhile fails at once
  (two would clean up each other's unfinished checkpoints and rewrite each other's metrics).
  The lock is the kernel's (flock on DIR/.lock, which names its holder): it goes with the
  process however that ends, kill -9 included, so there is never a stale lock to clear.
  Process 0 holds it for a multi-host run."""
  if jax.process_index() != 0:
    yield
    return
  with open(os.path.join(workdir, LOCK_FILE), 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'a process'
      raise UserError(f'workdir {workdir} is in use by another run ({holder}): wait for it to '
                      'end or stop it, or use another --workdir') from None
    except OSError as e:  # a file system without locks (some network or FUSE mounts)
      report.log(f'workdir {workdir} cannot be locked ({e.strerror or e}): nothing stops a '
                 'second run started on it meanwhile')
      yield
      return
    f.truncate(0)
    f.write(f'process {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# What fixes the shapes of the train state: resuming with another value fails.
STATE_FIELDS = {
    'model': lambda c: c.model,
    'dataset': lambda c: c.dataset,
    'optimizer': lambda c: c.optimizer,
    'augment.crop_size': lambda c: c.augment.crop_size,
    'ema_decay > 0': lambda c: c.get('ema_decay', 0.0) > 0,
    'lookahead.every > 0': lambda c: c.lookahead.every > 0,
    'model_options': lambda c: json.loads(json.dumps(c.model_options.to_dict())),
    'lr_multipliers or freeze_from_epoch': lambda c: bool(c.lr_multipliers or c.freeze_from_epoch),
}


def load_saved_config(workdir):
  """The config a workdir was trained with (config.json), or None."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  # Onto today's defaults, so a workdir written before a field existed still loads.
  config = config_lib.base_config()
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f'a JSON {type(saved).__name__}, not an object')
    with config.unlocked():
      config.update(saved)
  except (OSError, ValueError, TypeError) as e:  # a hand edit gone wrong, a field's type
    raise UserError(f'{path} is not a readable config: {first_line(e)}') from None
  return config


def require_saved_config(workdir):
  """load_saved_config, or one UserError where workdir has no config.json."""
  config = load_saved_config(workdir)
  if config is None:
    raise UserError(f'no {CONFIG_FILE} in {workdir}: pass --config, or train there first')
  return config


# What fixes which examples each step trains on: resuming with another value is allowed,
# and said, since the run is then no longer the uninterrupted one.
ORDER_FIELDS = ('seed', 'train_split', 'batch_size', 'input_shards')


def check_resumable(config, workdir):
  """UserError if config.json in workdir has other values for STATE_FIELDS; else the
  ORDER_FIELDS that changed, as one-line notices (none for a fresh workdir)."""
  saved = load_saved_config(workdir)
  if saved is None:
    return []
  for field, value in STATE_FIELDS.items():
    before, now = value(saved), value(config)
    if before != now:
      raise UserError(f'workdir {workdir} was trained with {field}={before!r}, this config has '
                      f'{field}={now!r}; use a new --workdir (or the same {field})')
  return [f'{field}={config[field]!r} (the run was trained with {saved[field]!r}): from here '
          'on the batches are not those of the uninterrupted run'
          for field in ORDER_FIELDS if saved.get(field) != config[field]]


def write_config(config, workdir):
  """Writes config.json."""
  _write_whole(os.path.join(workdir, CONFIG_FILE),
               config.to_json_best_effort(indent=2, sort_keys=True))


def write_dataset(config, source, workdir):
  """Writes dataset.json: what predict needs of the run's dataset (a data.Source), so that
  it classifies images where the dataset is not (another machine, one without TFDS)."""
  _write_whole(os.path.join(workdir, DATASET_FILE), json.dumps({
      'dataset': config.dataset, 'train_split': config.train_split,
      'class_names': list(source.class_names), 'image_shape': list(source.image_shape),
      'num_train': source.num_examples(config.train_split)}, indent=2))


def saved_dataset(config, workdir):
  """dataset.json's description where it is of config's dataset and train split, else None
  (absent: a run from before the file existed; torn, or not as written: a hand edit; another
  dataset): the caller reads the dataset itself then."""
  try:
    with open(os.path.join(workdir, DATASET_FILE)) as f:
      saved = json.load(f)
    names, (height, width, channels) = saved['class_names'], saved['image_shape']
    well_formed = (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
                   and all(_positive_int(v) for v in (channels, saved['num_train']))
                   and all(v is None or _positive_int(v) for v in (height, width)))
    if well_formed and (saved['dataset'], saved['train_split']) == (config.dataset,
                                                                   config.train_split):
      return {k: saved[k] for k in ('class_names', 'image_shape', 'num_train')}
  except (OSError, ValueError, TypeError, KeyError):
    pass
  return None


def _positive_int(value):
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _write_whole(path, text):
  """Process 0 writes the file atomically: a kill never leaves a half-written one."""
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
