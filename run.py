"""cnnjax command line: python run.py --config configs/cifar_lrn.py --workdir DIR.

Every config field can be overridden (--config.batch_size=256; in eval and predict modes
without --config, on the run's saved config.json). Re-running with the same --workdir
resumes from its latest checkpoint; --mode=eval evaluates a checkpoint without training,
--mode=predict classifies image files, --mode=plot draws the run's curves, --mode=bench
times the model, --mode=export writes the config's splits as an arrays file (--out) to
train from without TensorFlow. Bad input ends with one line on stderr and exit status 2.
SIGTERM/SIGINT during training finish the running steps, checkpoint and exit 0.
"""
import os
import re
import sys
import traceback

from cnnjax import cpu
from cnnjax.errors import UserError, first_line, typed_line

# --isa caps oneDNN's and XLA's instruction set before either is loaded (cnnjax/cpu.py).
cpu.cap_isa_from_argv(sys.argv)
# TensorFlow only reads the TFDS files here: silence its startup chatter, including the
# oneDNN notice it prints on CPUs where oneDNN is on (its math kernels are never used).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, "Recipe config file (configs/*.py); eval and predict modes default to "
    "the workdir's config.json.")
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and outputs.')
MODES = ['train', 'eval', 'predict', 'plot', 'bench', 'export']
_MODE = flags.DEFINE_string('mode', 'train',
                            'train: train and evaluate, resuming from the workdir; '
                            'eval: evaluate a checkpoint of the workdir without training; '
                            'predict: classify --images with the latest checkpoint; '
                            'plot: write workdir/plots/*.png from metrics.jsonl; '
                            'bench: time forward and forward-backward on synthetic input; '
                            'export: write the config\'s train and eval splits to --out.')
_STEP = flags.DEFINE_integer('step', None, 'With --mode=eval: the checkpoint step (default: latest).')
_IMAGES = flags.DEFINE_list('images', [], 'With --mode=predict: image files (comma-separated, '
                            'or space-separated after the flag).')
_OUT = flags.DEFINE_string('out', None, 'With --mode=export: the arrays file to write (*.npz); '
                           'train from it with --config.dataset=FILE.')
_TOP_K = flags.DEFINE_integer('top_k', 3, 'With --mode=predict: classes shown per image.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run through jax.distributed.initialize(), which '
    'finds the coordinator itself on SLURM, Kubernetes (JobSet), MPI and TPU clusters.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-process run by hand.')
flags.DEFINE_enum('isa', 'native', list(cpu.ISA_CAPS),
                  'Cap the CPU instruction set that oneDNN and XLA compile for (avx2: measure on '
                  'an AVX-512 machine what an AVX2-only one runs); sets ONEDNN_MAX_CPU_ISA and '
                  '--xla_cpu_max_isa.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')


def fail(message):
  print(f'error: {message}', file=sys.stderr, flush=True)
  leave(2)


def leave(code):
  """Ends the process at once, the error line the last it prints: every file of the run is
  closed by now (the loop's finally blocks ran). What Python's own exit would add is noise
  or worse: other threads failing of the same cause (a full disk, in tensorboardX's writer
  and orbax's), and in a multi-process run jax.distributed's shutdown barrier, which would
  wait for processes that are themselves waiting for this one in a collective; leaving
  stops this process's heartbeats, and the coordination service then ends the others."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


# The modes whose config defaults to the workdir's config.json (--config replaces it).
SAVED_CONFIG_MODES = ('eval', 'predict')


def parse_flags(argv):
  argv = _home_expanded(argv)
  try:
    return flags.FLAGS(_with_saved_config(argv))
  except Exception as e:
    _join_to_fail(argv)  # in a multi-process run, so that the others end too
    fail(_flag_error(argv, e))


HELP_FLAGS = {'-?', '--help', '--helpshort', '--helpfull', '--helpxml'}  # absl's
PATH_FLAGS = ('config', 'workdir', 'out', 'images')  # images: a comma-separated list


def _home_expanded(argv):
  """argv with a leading ~ of a path flag's value expanded, as the shell expands a word of
  its own but not one after --flag=: --workdir=~/runs/lrn is the home folder's runs/lrn,
  not a folder named '~' in the current one."""
  def expanded(name, value):
    if name == 'images':
      return ','.join(os.path.expanduser(path) for path in value.split(','))
    return os.path.expanduser(value)
  argv = list(argv)
  for i, arg in enumerate(argv):
    for name in PATH_FLAGS:
      if arg.startswith(f'--{name}='):
        argv[i] = f'--{name}=' + expanded(name, arg.split('=', 1)[1])
      elif arg == f'--{name}' and i + 1 < len(argv):
        argv[i + 1] = expanded(name, argv[i + 1])
  return argv


def _with_saved_config(argv):
  """argv, with --config=cnnjax/saved_config.py:WORKDIR added where a mode that reads the
  workdir's config.json gets no --config: so its --config.* overrides apply to it, and
  that config is loaded in one place. Elsewhere --config.* overrides without --config
  are a flags.Error naming what is missing."""
  if _flag_value(argv, 'config') or HELP_FLAGS.intersection(argv):
    return argv
  mode = _flag_value(argv, 'mode') or 'train'
  if mode in SAVED_CONFIG_MODES:
    workdir = _flag_value(argv, 'workdir')
    if not workdir:
      raise flags.Error('--workdir is required')
    from cnnjax import saved_config  # its get_config: the config.json, or a UserError
    return [argv[0], f'--config={saved_config.__file__}:{workdir}', *argv[1:]]
  if not any(arg.startswith('--config.') for arg in argv):
    return argv  # main() says what else is missing (an unknown mode, --config)
  if mode not in MODES:
    raise flags.Error(_unknown_mode(mode))
  if mode in MODE_FLAGS['config']:
    raise flags.Error('--config.* overrides need --config (e.g. --config configs/cifar_lrn.py)')
  raise flags.Error(f'--config.* does nothing with --mode={mode}')


def _unknown_mode(mode):
  return f'unknown mode {mode!r} (modes: {", ".join(MODES)})'


def _flag_error(argv, e):
  if isinstance(e, UserError):  # e.g. the workdir's config.json, read by cnnjax/saved_config.py
    return first_line(e)
  in_file = _raised_in_config_file(argv, e)
  if in_file:
    return f'cannot load config file {_flag_value(argv, "config")!r}: {in_file}'
  if isinstance(e, AttributeError) and "attribute 'get_config'" in str(e):
    return f'config file {_flag_value(argv, "config")!r} defines no get_config()'
  if isinstance(e, (KeyError, AttributeError)):
    return _unknown_field(argv, e)
  raised = _raised_by_config_file(e)
  if raised is not None:
    return f'cannot load config file {_flag_value(argv, "config")!r}: {typed_line(raised)}'
  if isinstance(e, OSError) and _UNREADABLE_CONFIG.search(str(e)):
    # Said here where an override was given (applying it reads the file), else in load_config.
    return f'cannot load config file {_flag_value(argv, "config")!r}: {_reason(e)}'
  if isinstance(e, (flags.Error, ValueError, TypeError)):
    return first_line(e)
  return f'cannot load the config: {typed_line(e)}'  # what else ml_collections may raise


def _unknown_field(argv, e):
  """The line for an override ml_collections cannot apply. It reports one of a field the
  config lacks as a KeyError (inside an AttributeError) of "'key'", then a line 'Did you
  mean "near" ...' if any."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  key, _, hint = str(e.args[0] if e.args else e).partition('\n')
  # An override into a value that has no fields: the config itself (get_config() returned
  # None, say) or one of its fields (--config.batch_size.foo).
  into = re.search(r"Attribute <class '([\w.]+)'>\.(\w+) does not exist and the type does "
                   r'not support indexing\. Attempting to lookup: (\S+)', key)
  type_name, missing, path = into.groups() if into else (None, None, '')
  names = path.split('.')
  if missing in names:
    where = len(names) - 1 - names[::-1].index(missing)  # its last mention: where it failed
    if where == 0:
      return _not_a_config_dict(_flag_value(argv, 'config'), type_name)
    what = 'None' if type_name == 'NoneType' else f'of type {type_name}'
    return (f"unknown config field 'config.{path}' (config.{'.'.join(names[:where])} is "
            f'{what}, which has no fields)')
  near = re.search(r'Did you mean "([^"]+)"', hint)
  return (f'unknown config field {_override_named(argv, key.strip(chr(34) + chr(39)))!r} '
          + (f'(did you mean {near.group(1)!r}?; ' if near else '(')
          + 'fields: cnnjax/config.py and the config file)')


def _raised_in_config_file(argv, e):
  """What the config file's own code raised, as 'line N: Type: text', or None: said as the
  file's error, not taken for what the same types mean from ml_collections (a KeyError is an
  override of an unknown field there, a KeyError in get_config is the file's own)."""
  given = _flag_value(argv, 'config')
  if not given:
    return None
  path = os.path.realpath(given.split(':', 1)[0])
  raised = _raised_by_config_file(e) or e
  if isinstance(raised, SyntaxError):  # compiling the file (no file name: null bytes in it)
    if raised.filename and os.path.realpath(raised.filename) != path:
      return None
    where = f'line {raised.lineno}: ' if raised.lineno else ''
    return f'{where}{type(raised).__name__}: {raised.msg}'  # .msg: str() adds the file name
  lines = [frame.lineno for frame in traceback.extract_tb(raised.__traceback__)
           if os.path.realpath(frame.filename) == path]
  return f'line {lines[-1]}: {typed_line(raised)}' if lines else None


def _raised_by_config_file(e):
  """What a config file raised while loading (a TypeError or ValueError, e.g. get_config()
  given an argument it does not take), or None. ml_collections re-raises it as the same type
  whose text is the whole traceback; the original is that exception's __context__."""
  while e is not None:
    if str(e).startswith('Error whilst parsing config file'):
      return e.__context__
    e = e.__context__
  return None


# ml_collections' words for a config file it could not read (its OSError holds the file's own).
_UNREADABLE_CONFIG = re.compile('Failed loading config file|Configuration is not available')


def _reason(e):
  """The file's own reason ('No such file or directory') in ml_collections' OSError."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  said = re.search(r'\[Errno \d+\] ([^:]+)', str(e))
  return said.group(1) if said else lines[-1] if lines else type(e).__name__


def _join_to_fail(argv):
  """A process of a multi-process run whose flags do not parse joins the run before it
  fails (see fail()), so the others are ended within HEARTBEAT_TIMEOUT_S instead of
  waiting in jax.distributed.initialize for the process that never comes (300 s)."""
  values = {name: _flag_value(argv, name)
            for name in ('coordinator_address', 'num_processes', 'process_id')}
  if None in values.values():
    return
  try:
    _join(values['coordinator_address'], int(values['num_processes']),
          int(values['process_id']), initialization_timeout=60)
  except Exception:  # noqa: BLE001  (no run to join: fail alone)
    pass


def _flag_value(argv, name):
  """The value of --name=V or --name V in argv (flags not parsed yet), else None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_named(argv, leaf):
  """The --config.a.b override whose path holds the unknown key `leaf`."""
  for arg in argv:
    if arg.startswith('--config.'):
      path = arg[2:].split('=', 1)[0]
      if leaf in path.split('.'):
        return path
  return leaf


def config_given():
  return bool(flags.FLAGS['config'].present)  # (the value is None also where get_config() is)


def load_config():
  name = flags.FLAGS['config'].config_filename
  config = _CONFIG.value
  if isinstance(config, ml_collections.ConfigDict):
    return config
  if config is not None:
    try:
      config.keys()  # ml_collections defers a file it could not read to here: it raises now
    except OSError as e:
      fail(f'cannot load config file {name!r}: {_reason(e)}')
    except Exception:  # noqa: BLE001  (not a mapping: said below)
      pass
  fail(_not_a_config_dict(name, type(config).__name__))


def _not_a_config_dict(name, type_name):
  """What a config file whose get_config() returned a value of type `type_name` is told."""
  if type_name == 'NoneType':
    return f'config file {name!r}: get_config() returned None (no return statement?)'
  return (f'config file {name!r}: get_config() returned a value of type {type_name}, not a '
          'ConfigDict (configs/*.py start from cnnjax.config.base_config())')


# A process silent this long is taken as dead and the coordination service ends the run
# on every process (JAX's default is 100 s): a failed process never leaves the others
# waiting in a collective for long.
HEARTBEAT_TIMEOUT_S = 20


def _join(*args, **kwargs):
  """jax.distributed.initialize with this run's heartbeat timeout."""
  import jax
  jax.distributed.initialize(*args, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, **kwargs)


def init_distributed():
  """Connects the processes of a multi-host run, before any device is touched."""
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      fail('--coordinator_address needs --num_processes and --process_id')
    _join(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    try:
      _join()
    except (ValueError, RuntimeError) as e:
      fail(f'--distributed: {first_line(e)}')


def export(config, out):
  """The config's train and eval splits, under their split names, as an arrays file."""
  from cnnjax import data, workdir as workdir_lib
  if config is None or not out:
    fail('--mode=export needs --config and --out FILE.npz')
  if not out.endswith(data.ARRAYS_SUFFIX):
    fail(f'--out must end in {data.ARRAYS_SUFFIX}, got {out!r}')
  # Made and probed first, as a workdir is: a bad path fails before the data is read.
  workdir_lib.make_writable(os.path.dirname(os.path.abspath(out)), f'--out {out!r}')
  source = data.info(config.dataset, config.data_dir, config.download)
  splits = {split.split('[')[0]: split for split in (config.train_split, config.eval_split)}
  if len(splits) < 2:
    fail(f'train_split and eval_split are both of {next(iter(splits))!r}: nothing would tell '
         'them apart in the file')
  try:
    counts = data.export(source, splits, out)
  except OSError as e:  # a full disk, say
    fail(f'cannot write --out {out!r}: {e.strerror or e}')
  print(f'wrote {out}: ' + ', '.join(f'{name} = {splits[name]} ({n:,} examples)'
                                    for name, n in counts.items()) +
        f'; train from it with --config.dataset={out}')


# Flags that act in some modes only: given in another, they would do nothing.
MODE_FLAGS = {'step': ('eval',), 'images': ('predict',), 'top_k': ('predict',),
              'out': ('export',), 'config': ('train', 'eval', 'predict', 'bench', 'export'),
              'workdir': ('train', 'eval', 'plot', 'predict')}


def main(argv):
  mode = _MODE.value
  if mode not in MODES:
    fail(_unknown_mode(mode))
  for name, modes in MODE_FLAGS.items():
    if flags.FLAGS[name].present and mode not in modes:
      fail(f'--{name} does nothing with --mode={mode} (it is for --mode='
           f'{" / --mode=".join(modes)})')
  extra = argv[1:]
  if extra and mode != 'predict':
    fail(f'unexpected arguments: {" ".join(extra)}')
  if mode == 'train' and not _WORKDIR.value and not config_given():
    fail('--config and --workdir are required: python run.py --config configs/cifar_lrn.py '
         '--workdir DIR (--help for more)')
  if not _WORKDIR.value and mode not in ('bench', 'export'):
    fail('--workdir is required')
  logging.set_verbosity(logging.ERROR)  # TFDS/orbax info chatter; our output is print()
  init_distributed()
  from cnnjax import loop
  try:
    if mode == 'bench':
      if not config_given():
        fail('--config is required (e.g. --config configs/imagenet_vgg16.py)')
      from cnnjax import bench
      bench.run(load_config())
    elif mode == 'train':
      if not config_given():
        fail('--config is required (e.g. --config configs/cifar_lrn.py)')
      loop.train_and_evaluate(load_config(), _WORKDIR.value)
    elif mode == 'export':
      export(load_config() if config_given() else None, _OUT.value)
    elif mode == 'plot':
      from cnnjax import plots
      for path in plots.write(_WORKDIR.value):
        print(f'wrote {path}')
    elif mode == 'predict':  # config: --config's, else the workdir's (_with_saved_config)
      from cnnjax import predict
      predict.run(_WORKDIR.value, _IMAGES.value + extra, _TOP_K.value, load_config())
    else:
      loop.evaluate_checkpoint(load_config(), _WORKDIR.value, _STEP.value)
  except UserError as e:
    fail(str(e))
  except OSError as e:  # the machine's, not cnnjax's: a full disk, a path in the way
    fail(f'{e.filename}: {e.strerror}' if e.filename and e.strerror else first_line(e))


if __name__ == '__main__':
  logging.set_verbosity(logging.ERROR)  # absl's warnings while parsing: said as our one line
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:
    # Ctrl-C outside the training steps (inside them it stops the loop with a checkpoint):
    # while loading data, restoring, evaluating, exporting. Checkpoints, config.json, plots and
    # exports are replaced whole and metrics lines flushed as written: nothing to say but
    # that it stopped.
    print('stopped by SIGINT', file=sys.stderr, flush=True)
    leave(130)  # the shell's code for a process ended by SIGINT
