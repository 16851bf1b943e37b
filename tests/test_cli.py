"""run.py as a user runs it: a short real run, resume, and one-line errors."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from cnnjax import data
from cnnjax.errors import UserError
from tests.conftest import ROOT, SMALL_RUN, as_flags, run_py

SMALL = as_flags(dict(SMALL_RUN, batch_size=64, log_every=2))


run = run_py


def test_short_run_logs_like_the_seed_evaluates_and_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  first = run('--workdir', workdir, '--config.num_train_steps=5', '--config.checkpoint_every=4',
              *SMALL)
  assert first.returncode == 0, first.stderr
  out = first.stdout
  assert 'model: cifar_lrn, 1,068,298 parameters' in out
  assert 'train[:256]=256 examples' in out and 'test[:100]=100 examples' in out
  assert re.search(r'^devices: \d+ x ', out, re.M)
  steps = re.findall(r'^step (\d+), loss = \d+\.\d\d \(\d+\.\d examples/sec; \d+\.\d{3} sec/batch\)$',
                     out, re.M)
  assert steps == ['0', '2', '4']
  assert re.search(r'^step 5: precision @ 1 = 0\.\d{4} \(\d+/100\)', out, re.M)
  assert os.path.exists(os.path.join(workdir, 'config.json'))

  second = run('--workdir', workdir, '--config.num_train_steps=7', *SMALL)
  assert second.returncode == 0, second.stderr
  assert 'resumed from the checkpoint at step 5' in second.stdout
  assert re.findall(r'^step (\d+), loss', second.stdout, re.M) == ['6']
  assert re.search(r'^step 7: precision @ 1', second.stdout, re.M)
  assert 'nothing to train' not in second.stdout

  # A finished run asked for fewer steps than it has: it says so and evaluates, training none.
  third = run('--workdir', workdir, '--config.num_train_steps=3', *SMALL)
  assert third.returncode == 0, third.stderr
  assert ('nothing to train: the checkpoint at step 7 is at or past num_train_steps=3'
          in third.stdout)
  assert not re.search(r'^step \d+, loss', third.stdout, re.M)
  assert re.search(r'^step 7: precision @ 1', third.stdout, re.M)


@pytest.mark.parametrize('args,message', [
    (['--config.no_such_field=1'], "unknown config field 'config.no_such_field' (fields:"),
    (['--config.batchsize=3'], "unknown config field 'config.batchsize' (did you mean "
                               "'batch_size'?;"),
    (['--config.augment.flipp=0'], "unknown config field 'config.augment.flipp' (did you "
                                   "mean 'flip'?;"),
    (['--config.augment.brightness.max=1'], "unknown config field 'config.augment.brightness."
                                            "max' (config.augment.brightness is of type float, "
                                            'which has no fields)'),
    (['--config.dataset=cifar11'], "unknown dataset 'cifar11'"),
    (['--config.model=resnet9000'], "bad config: model='resnet9000'"),
    (['--config.seed=-1'], 'bad config: seed must be >= 0, got -1'),
    (['--config.eval_split=test[5:3]'], "bad split 'test[5:3]' for cifar10: it holds no "
                                        "examples"),
    (['--config.eval_split=test[:10%%]'], "bad split 'test[:10%%]' for cifar10: Error parsing "
                                          "split 'test[:10%%]'"),  # TFDS's text has 2 lines
    (['--config.augment.crop_size=-3'], 'bad config: augment.crop_size must be >= 0'),
    (['--config.bench.steps=0'], 'bad config: bench.steps must be positive, got 0'),
    (['--config.optimizer=adamw'], "bad config: optimizer='adamw' is not one of sgd, momentum"),
    (['--config.weight_loss.local3=-0.004'],
     "bad config: weight_loss['local3'] must be >= 0, got -0.004"),
    (['--config.optimizer=momentum', '--config.momentum=1.5'],
     'bad config: momentum must be in [0, 1), got 1.5'),
    (['--config.schedule=exponential_decay', '--config.decay_steps=100',
      '--config.decay_rate=0'], 'bad config: decay_rate must be positive, got 0.0'),
    (['--config.schedule=exponential_decay', '--config.decay_steps=-100'],
     'bad config: exponential_decay needs decay_steps > 0 or decay_epochs > 0'),
    (['--config.schedule=exponential_decay', '--config.decay_steps=100',
      '--config.decay_epochs=-1'], 'bad config: decay_steps and decay_epochs must be >= 0'),
    (['--config.schedule=triangular', '--config.triangular.end=-0.1'],
     'bad config: triangular.start and end must be >= 0, got 0.2 and -0.1'),
    (['--config.schedule=cosine'], "bad config: schedule='cosine' is not one of constant"),
    (['--config.input_shards=3'], 'bad config: input_shards=3 must be a multiple of the 1 '
                                  'process(es) and divide batch_size='),
    (['--config.train_split=train[:100]'],
     "bad config: train split 'train[:100]' has 100 examples, fewer than batch_size="),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, message):
  result = run('--workdir', str(tmp_path), *args)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'error: {result.stderr.strip()[7:]}']
  assert message in result.stderr


@pytest.mark.parametrize('args,message', [
    (['--mode=train', '--step', '3'], '--step does nothing with --mode=train (it is for --mode=eval)'),
    (['--mode=eval', '--top_k=2'], '--top_k does nothing with --mode=eval (it is for --mode=predict)'),
    (['--mode=bench', '--images', 'a.png'],
     '--images does nothing with --mode=bench (it is for --mode=predict)'),
    (['--out', 'x.npz'], '--out does nothing with --mode=train (it is for --mode=export)'),
    (['--mode=plot'], '--config does nothing with --mode=plot (it is for --mode=train / '
                      '--mode=eval / --mode=predict / --mode=bench / --mode=export)'),
    (['--mode=export', '--out', 'x.npz'], '--workdir does nothing with --mode=export (it is '
     'for --mode=train / --mode=eval / --mode=plot / --mode=predict)'),
])
def test_a_flag_that_would_do_nothing_in_the_mode_is_one_line(tmp_path, args, message):
  result = run('--workdir', str(tmp_path), *args)  # run() passes --config
  assert result.returncode == 2 and result.stderr.strip() == f'error: {message}'


@pytest.mark.parametrize('args,message', [
    (['--workdir', 'W', '--config.batch_size=8'],
     '--config.* overrides need --config (e.g. --config configs/cifar_lrn.py)'),
    (['--mode=plot', '--workdir', 'W', '--config.batch_size=8'],
     '--config.* does nothing with --mode=plot'),
    (['--mode=evaluate', '--workdir', 'W', '--config.batch_size=8'],
     "unknown mode 'evaluate' (modes: train, eval, predict, plot, bench, export)"),
    (['--mode=eval', '--config.eval_split=test[:8]'], '--workdir is required'),
    (['--mode=eval', '--workdir', 'W', '--config.eval_split=test[:8]'],
     'no config.json in {w}: pass --config, or train there first'),
])
def test_overrides_without_config_are_one_line_where_no_saved_config_takes_them(
    tmp_path, args, message):
  workdir = str(tmp_path / 'run')
  result = run_py(*[workdir if a == 'W' else a for a in args], config=None)
  assert result.returncode == 2
  assert result.stderr.strip() == 'error: ' + message.format(w=workdir)


@pytest.mark.parametrize('mode', ['eval', 'predict'])
def test_help_in_modes_that_read_the_workdirs_config_needs_no_workdir(mode):
  result = run_py(f'--mode={mode}', '--help', config=None)
  assert 'error' not in result.stderr
  assert result.stdout.startswith('cnnjax command line:')
  assert result.stdout == run_py('--help', config=None).stdout  # train mode's, absl's usage


@pytest.mark.parametrize('text,reason,modes', [
    ('{"batch_size": 12', "Expecting ',' delimiter", ['train', 'eval', 'predict']),
    ('[1, 2]', 'a JSON list, not an object', ['eval']),
    ('{"batch_size": "x"}', "Could not override field 'batch_size'", ['eval']),
])
def test_a_hand_broken_config_json_is_one_line_and_left_as_it_is(tmp_path, text, reason, modes):
  saved = tmp_path / 'config.json'
  saved.write_text(text)
  for mode in modes:
    result = run_py(f'--mode={mode}', '--workdir', str(tmp_path),
                    *(['--images', 'a.png'] if mode == 'predict' else []),
                    config='configs/cifar_lrn.py' if mode == 'train' else None)
    assert result.returncode == 2
    assert result.stderr.startswith(f'error: {saved} is not a readable config: {reason}')
    assert len(result.stderr.strip().splitlines()) == 1
    assert saved.read_text() == text


def test_missing_offline_data_names_tfds_data_dir(tmp_path):
  empty = tmp_path / 'no-data'
  empty.mkdir()
  result = run('--workdir', str(tmp_path / 'w'), f'--config.data_dir={empty}',
               '--config.download=False')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'TFDS_DATA_DIR' in lines[0] and 'data_dir' in lines[0]


def test_failed_download_names_tfds_data_dir(tmp_path, monkeypatch):
  # Offline, TFDS's download retries for minutes; the same failure, raised at once.
  import tensorflow_datasets as tfds

  def offline(self, *args, **kwargs):
    raise ConnectionError('Failed to resolve www.cs.toronto.edu')

  monkeypatch.setattr(data, '_offline', lambda: False)  # the network looks reachable
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
  with pytest.raises(UserError, match='downloading it failed .*TFDS_DATA_DIR.*data_dir'):
    data.info('cifar10', data_dir=str(tmp_path), download=True)


def test_unreachable_network_fails_at_once_without_trying_to_download(tmp_path, monkeypatch):
  import socket
  import tensorflow_datasets as tfds

  def no_network(*args, **kwargs):
    raise socket.gaierror(-2, 'Name or service not known')

  def download(self, *args, **kwargs):
    raise AssertionError('tried to download although the network is unreachable')

  monkeypatch.delenv('HTTPS_PROXY', raising=False)
  monkeypatch.delenv('https_proxy', raising=False)
  monkeypatch.setattr(socket, 'create_connection', no_network)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', download)
  with pytest.raises(UserError, match='downloading it failed .ConnectionError.; offline'):
    data.info('cifar10', data_dir=str(tmp_path), download=True)


def test_eval_mode_without_a_checkpoint_is_one_line(tmp_path):
  no_config = run('--mode=eval', '--workdir', str(tmp_path), config=None)
  assert no_config.returncode == 2
  assert no_config.stderr.strip() == f'error: no config.json in {tmp_path}: pass --config, or train there first'
  no_ckpt = run('--mode=eval', '--workdir', str(tmp_path))
  assert no_ckpt.returncode == 2
  assert no_ckpt.stderr.strip() == f'error: no checkpoints in {tmp_path}: train first, or point --workdir at a run'


def test_a_damaged_tfds_file_is_one_line_naming_the_split(tmp_path):
  prepared = pathlib.Path(data.info('cifar10').builder.data_dir)
  copy = tmp_path / 'tfds' / 'cifar10' / prepared.name
  copy.mkdir(parents=True)
  for path in prepared.iterdir():  # the test split's file cut short, as by a copy that broke
    if 'test.tfrecord' in path.name:
      (copy / path.name).write_bytes(path.read_bytes()[:1_000_000])
    else:
      (copy / path.name).symlink_to(path)
  result = run('--workdir', str(tmp_path / 'run'), *SMALL, f'--config.data_dir={tmp_path}/tfds',
               '--config.eval_split=test')
  assert result.returncode == 2
  assert re.fullmatch(rf"error: cannot read split 'test' of cifar10 in {copy} \(DataLossError: "
                      r"truncated record at \d+.*\); its files may be damaged: prepare it again\n",
                      result.stderr), result.stderr


def test_an_os_error_is_one_line_naming_the_file(tmp_path):
  (tmp_path / 'metrics.jsonl').mkdir()  # where the run's history goes: a folder in the way
  result = run('--workdir', str(tmp_path), *SMALL)
  assert (result.returncode, result.stderr) == (
      2, f'error: {tmp_path}/metrics.jsonl: Is a directory\n')


def test_no_arguments_says_how_to_run():
  result = run_py(config=None)
  assert result.returncode == 2
  assert result.stderr == ('error: --config and --workdir are required: python run.py --config '
                           'configs/cifar_lrn.py --workdir DIR (--help for more)\n')


HOLD_THE_WORKDIR = """
import sys, time
from cnnjax import workdir
with workdir.held(sys.argv[1]):
  print('held', flush=True)
  time.sleep(600)
"""


def test_a_workdir_in_use_refuses_a_second_run_and_is_free_once_its_holder_is_killed(tmp_path):
  import socket
  holder = subprocess.Popen([sys.executable, '-c', HOLD_THE_WORKDIR, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    refused = run('--workdir', str(tmp_path), *SMALL)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f'error: workdir {tmp_path} is in use by another run (process {holder.pid} on '
        f'{socket.gethostname()}): wait for it to end or stop it, or use another --workdir')
    assert os.listdir(tmp_path) == ['.lock']  # nothing read or written: no config, no metrics
  finally:
    holder.kill()  # SIGKILL: the lock goes with the process, nothing is left to clear
    holder.wait()
  after = run('--workdir', str(tmp_path), '--config.num_train_steps=2', *SMALL)
  assert after.returncode == 0, after.stderr
  assert re.search(r'^step 2: precision @ 1', after.stdout, re.M)


def test_missing_config_file_and_unwritable_workdir(tmp_path):
  for given, reason in (('configs/nope.py', 'No such file or directory'),
                        ('configs', 'Is a directory')):
    # With an override, ml_collections reads the file while parsing it: the same line.
    for overrides in ([], ['--config.batch_size=64']):
      missing = run_py('--workdir', str(tmp_path), *overrides, config=given)
      assert missing.returncode == 2
      assert missing.stderr.strip() == f"error: cannot load config file '{given}': {reason}"
  no_get_config = tmp_path / 'recipe.py'
  no_get_config.write_text('batch_size = 128\n')
  for given in (['--config', str(no_get_config)], [f'--config={no_get_config}']):
    result = run(*given, '--workdir', str(tmp_path), config=None)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: config file '{no_get_config}' defines no get_config()"
  # ml_collections wraps a TypeError of the call in its whole traceback: the line says the error.
  given = 'configs/cifar_lrn.py:foo'
  result = run_py('--workdir', str(tmp_path), config=given)
  assert result.returncode == 2
  assert result.stderr.strip() == (f"error: cannot load config file '{given}': TypeError: "
                                   'get_config() takes 0 positional arguments but 1 was given')
  blocker = tmp_path / 'file'
  blocker.write_text('')
  unwritable = run('--workdir', str(blocker / 'sub'))
  assert unwritable.returncode == 2
  assert unwritable.stderr.strip() == \
      f"error: workdir '{blocker / 'sub'}' is not writable: {blocker} is a file"


def test_a_path_flag_after_equals_expands_a_leading_tilde_as_the_shell_would(tmp_path):
  """The shell leaves the ~ of --workdir=~/runs as it is: cnnjax expands it (predict's
  --images: tests/test_usage.py), so no folder named '~' is made where the run starts."""
  home = {'HOME': str(tmp_path)}
  (tmp_path / 'file').write_text('')
  result = run_py('--config=~/nope.py', '--workdir=~/w', '--config.seed=1', config=None, env=home)
  assert result.returncode == 2
  assert result.stderr.strip() == \
      f"error: cannot load config file '{tmp_path / 'nope.py'}': No such file or directory"
  result = run('--workdir=~/file/sub', env=home)
  assert result.returncode == 2
  assert result.stderr.strip() == (f"error: workdir '{tmp_path / 'file' / 'sub'}' is not "
                                   f"writable: {tmp_path / 'file'} is a file")
  result = run('--mode=export', '--out=~/file/x.npz', env=home)
  assert result.returncode == 2
  assert result.stderr.strip() == (f"error: --out '{tmp_path / 'file' / 'x.npz'}' is not "
                                   f"writable: {tmp_path / 'file'} is a file")
  assert not (ROOT / '~').exists()


@pytest.mark.parametrize('source, error', [
    # ml_collections wraps ValueError and TypeError in their traceback: the line says the error.
    ("def get_config():\n  raise ValueError('no learning rate\\nmore text')\n",
     "line 2: ValueError: no learning rate"),
    ("def get_config():\n  raise RuntimeError\n", "line 2: RuntimeError"),  # its type, once
    # The types that mean an unknown override field from ml_collections are the file's own here.
    ("def get_config():\n  settings = {}\n  return settings['lr']\n", "line 3: KeyError: 'lr'"),
    ("import ml_collections\n\ndef get_config():\n  c = ml_collections.ConfigDict()\n"
     "  return c.lr\n", "line 5: AttributeError: \"'lr'\""),
    ("def helper():\n  return undefined\n\ndef get_config():\n  return helper()\n",
     "line 2: NameError: name 'undefined' is not defined"),  # the deepest line of the file
    ("import nosuchmodule\n", "line 1: ModuleNotFoundError: No module named 'nosuchmodule'"),
    ("def get_config():\n  return (\n", "line 2: SyntaxError: '(' was never closed"),
    ("\0", "SyntaxError: source code string cannot contain null bytes"),  # a binary file
])
def test_a_config_file_that_raises_is_one_line_naming_its_line(tmp_path, source, error):
  config = tmp_path / 'recipe.py'
  config.write_text(source)
  result = run_py('--workdir', str(tmp_path / 'w'), config=str(config))
  assert result.returncode == 2
  assert result.stderr.strip() == f"error: cannot load config file '{config}': {error}"
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('returned, error', [
    ('None', 'returned None (no return statement?)'),
    ("{'batch_size': 64}", 'returned a value of type dict, not a ConfigDict (configs/*.py '
                           'start from cnnjax.config.base_config())'),
    ('7', 'returned a value of type int, not a ConfigDict (configs/*.py start from '
          'cnnjax.config.base_config())'),
])
def test_a_config_file_that_returns_no_config_is_one_line(tmp_path, returned, error):
  config = tmp_path / 'recipe.py'
  config.write_text(f'def get_config():\n  return {returned}\n')
  # With an override too: applying it to what get_config() returned fails first.
  for overrides in ([], ['--config.batch_size=64']):
    result = run_py('--workdir', str(tmp_path / 'w'), *overrides, config=str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: config file '{config}': get_config() {error}"


def test_without_the_onednn_extension_runs_on_xla_and_says_so(tmp_path):
  # A checkout whose native build failed (no compiler, another platform): same code, no .so.
  import shutil
  for name in ('cnnjax', 'configs'):
    shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns('*.so'))
  shutil.copy(ROOT / 'run.py', tmp_path)
  result = run('--workdir', str(tmp_path / 'w'), '--config.num_train_steps=2', *SMALL,
               cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  kernel_lines = [l for l in result.stdout.splitlines() if l.startswith('kernels: ')]
  assert kernel_lines == ['kernels: XLA (the oneDNN extension was not built; see the install '
                          'notes in README.md)'], result.stdout
  assert re.search(r'^step 2: precision @ 1 = ', result.stdout, re.M)


def test_unknown_cpu_kernels_setting_is_one_line(tmp_path):
  result = run('--workdir', str(tmp_path), *SMALL, env={'CNNJAX_CPU_KERNELS': 'fast'})
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: CNNJAX_CPU_KERNELS='fast' is not one of auto, "
                                   "onednn, xla")
