import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'tensorflow_datasets'

# Real data for tests comes from ../shared, as for CI; an explicit TFDS_DATA_DIR wins.
if 'TFDS_DATA_DIR' not in os.environ and SHARED_DATA.is_dir():
  os.environ['TFDS_DATA_DIR'] = str(SHARED_DATA)
if os.environ.get('TFDS_DATA_DIR'):  # absolute: some tests run in another directory
  os.environ['TFDS_DATA_DIR'] = os.path.abspath(os.environ['TFDS_DATA_DIR'])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The CPU kernel choices (cnnjax/kernel_choice.py) of this session, shared with its
# pytest-xdist workers and the runs they start: measured afresh, never the user's ~/.cache;
# removed when the process that made it ends.
if 'CNNJAX_KERNEL_CACHE' not in os.environ:
  _KERNEL_CACHE_DIR = tempfile.mkdtemp(prefix='cnnjax-test-kernels-')
  atexit.register(shutil.rmtree, _KERNEL_CACHE_DIR, ignore_errors=True)
  os.environ['CNNJAX_KERNEL_CACHE'] = os.path.join(_KERNEL_CACHE_DIR, 'kernel_choices.json')


# The variables that choose what the code under test computes and where it reads and writes.
WATCHED_ENV = ('CNNJAX_', 'ONEDNN_', 'XLA_', 'JAX_', 'TFDS_', 'TMPDIR')


@pytest.fixture(autouse=True)
def _environment_left_as_found():
  """A test that leaves one of those changed fails: every test after it in the same worker
  would run in another environment than it says (an ISA cap left set once changed the
  CPU kernels of a later resume test's subprocesses)."""
  def watched():
    return {k: v for k, v in os.environ.items() if k.startswith(WATCHED_ENV)}
  before = watched()
  yield
  after = watched()
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
  assert not changed, f'the test left these environment variables changed: {changed}'


@pytest.fixture(autouse=True)
def _temp_files_kept_with_the_test(tmp_path_factory, monkeypatch):
  """What a test and the processes it starts put in the temp directory goes in one of its
  own (pytest prunes old ones), not the machine's /tmp: TFDS leaves a folder there each time
  it builds a dataset that is not prepared (its DatasetInfo.initialize_from_bucket)."""
  temp = str(tmp_path_factory.mktemp('temp'))
  monkeypatch.setattr(tempfile, 'tempdir', temp)
  monkeypatch.setenv('TMPDIR', temp)


@pytest.fixture(scope='session')
def tf():
  import tensorflow
  tensorflow.config.set_visible_devices([], 'GPU')
  return tensorflow


@pytest.fixture(params=['onednn', 'xla'])
def cpu_kernels(request):
  """Runs a test on both CPU paths: oneDNN's kernels and XLA's own (cnnjax/kernels.py)."""
  from cnnjax import kernels
  with kernels.using(request.param):
    yield request.param


def unset_env(monkeypatch, *names):
  """Unsets environment variables for one test. Each is as it was again afterwards, even
  where the code under test sets it: monkeypatch.delenv of an unset variable records
  nothing to undo, and a variable set later would stay for every test after it."""
  for name in names:
    monkeypatch.setenv(name, '')
    monkeypatch.delenv(name)


def one_kernel_path():
  """CNNJAX_CPU_KERNELS for runs compared across device or process counts: under `auto` one
  device's batch may take oneDNN's kernel and another's XLA's, and the two round differently."""
  from cnnjax import kernels
  return {'CNNJAX_CPU_KERNELS': 'onednn' if kernels.available() else 'xla'}


def recipe_config(name, **overrides):
  """configs/<name>.py's config with `overrides` applied, as --config.FIELD=VALUE would."""
  import importlib
  c = importlib.import_module(f'configs.{name}').get_config()
  c.update(overrides)
  return c


def as_flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


# Eight CPU devices for a subprocess (tests of data parallelism without a GPU).
EIGHT = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}

# run.py with TensorFlow and TFDS unimportable, as on a GPU image that has neither:
# `python -c WITHOUT_TF ARGS` from the project root.
WITHOUT_TF = '''
import runpy, sys
for name in ('tensorflow', 'tensorflow_datasets'):
  sys.modules[name] = None  # `import` raises ImportError
sys.argv = ['run.py', *sys.argv[1:]]
runpy.run_path('run.py', run_name='__main__')
'''

# The small real slices the command-line tests train on (each test adds its step counts).
SMALL_RUN = dict(train_split='train[:256]', eval_split='test[:100]', eval_batch_size=64)


def child_env(env=None):
  """This process's environment with `env` applied, for a subprocess: a None value unsets
  that variable there."""
  return {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}


def run_code(code, *args, env=None, timeout=600):
  """`python -c CODE ARGS` from the project root, output captured; env as for child_env."""
  return subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, env=child_env(env),
                        capture_output=True, text=True, timeout=timeout)


def run_py(*args, config='configs/cifar_lrn.py', env=None, without_tf=False, cwd=ROOT,
           wait=True, **popen):
  """`python run.py [--config CONFIG] ARGS` from the project root (or cwd), as a user runs it.

  env: variables to add (a None value removes one). without_tf: with TensorFlow and TFDS
  unimportable (WITHOUT_TF). wait=True: the finished process (subprocess.run, output
  captured, at most 600 s); wait=False: the started one (Popen, stdout and stderr piped
  unless `popen` says otherwise).
  """
  command = [sys.executable, *(['-c', WITHOUT_TF] if without_tf else ['run.py']),
             *(['--config', config] if config else []), *args]
  if wait:
    return subprocess.run(command, cwd=cwd, env=child_env(env), capture_output=True,
                          text=True, timeout=600)
  popen = {'stdout': subprocess.PIPE, 'stderr': subprocess.PIPE, **popen}
  return subprocess.Popen(command, cwd=cwd, env=child_env(env), text=True, **popen)


def small_config(**overrides):
  """Recipe A on small real slices: fast enough for a test, real enough to learn."""
  # 300 = 2 * 128 + 44: a padded last batch.
  return recipe_config('cifar_lrn', **dict(dict(
      train_split='train[:512]', eval_split='test[:300]', batch_size=64, eval_batch_size=128),
      **overrides))


# A short Recipe G (configs/cifar_fast.py) with its own rates: a narrow network on 512 real
# images at batch 64, 8 steps an epoch, 40 steps (5 epochs, flips alternating), the
# whitening bias frozen after 3.
SHORT_FAST = dict(train_split='train[:512]', eval_split='test[:200]', batch_size=64,
                  eval_batch_size=40, num_train_steps=40, log_every=1, checkpoint_every=0,
                  model_options=dict(widths=(16, 32, 32)), whiten=dict(images=512))


def short_fast_config(**overrides):
  return recipe_config('cifar_fast', **dict(SHORT_FAST, **overrides))


def restore(workdir, step, config):
  """The state saved at `step` in workdir (a run of `config`), read back on this process's
  devices through the read-only path predict uses: no data read, nothing computed."""
  from cnnjax import checkpoint, data, parallel, state
  source = data.info(config.dataset, config.data_dir, download=False)
  like = state.build(config, state.DataSpec.of(source, config.train_split),
                     parallel.make_mesh(), initial=False).state
  ckpt = checkpoint.Checkpoints(str(workdir), config.keep_checkpoints, read_only=True)
  try:
    return ckpt.restore(step, like)
  finally:
    ckpt.close()


def assert_same_state(a, b):
  """Two pytrees of arrays (train states) equal bit for bit, leaf for leaf."""
  import jax
  import numpy as np
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
