"""Two local processes joined by jax.distributed on 127.0.0.1, against one process."""
import json
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cnnjax import checkpoint
from tests.conftest import ROOT, as_flags, child_env, one_kernel_path, restore, run_py, small_config

OVERRIDES = ['train_split=train[:256]', 'eval_split=test[:101]', 'batch_size=32',
             'eval_batch_size=16', 'log_every=1', 'eval_every=0', 'checkpoint_every=2',
             'num_train_steps=4', 'optimizer=sgd', 'learning_rate=0.05', 'input_shards=2']


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(num_processes, process_id, port, workdir, out, extra=(), recipe=False):
  """A worker process; recipe=True: `extra` names the recipe and all its overrides."""
  # No XLA_FLAGS: one CPU device per process.
  env = child_env({'PYTHONPATH': str(ROOT), **one_kernel_path(), 'XLA_FLAGS': None})
  return subprocess.Popen(
      [sys.executable, 'tests/multiprocess_worker.py', f'127.0.0.1:{port}', str(num_processes),
       str(process_id), str(workdir), str(out), *([] if recipe else OVERRIDES), *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_train_like_one(tmp_path):
  port = free_port()
  # The two processes feed from data on their devices, two steps per dispatch; the one
  # process from host batches, one step per dispatch.
  procs = [start(2, i, port, tmp_path / 'two', tmp_path / f'two_{i}.npz',
                 ['data_on_device=true', 'steps_per_dispatch=2']) for i in range(2)]
  single = start(1, 0, free_port(), tmp_path / 'one', tmp_path / 'one.npz',
                 ['data_on_device=false', 'steps_per_dispatch=1'])
  outputs = [p.communicate(timeout=600) for p in (*procs, single)]
  for p, (out, err) in zip((*procs, single), outputs):
    assert p.returncode == 0, err[-3000:]
  two_0, two_1, one = (np.load(tmp_path / f'{n}.npz') for n in ('two_0', 'two_1', 'one'))
  # Only process 0 writes the console log.
  assert 'devices: 2 x cpu (2 process(es))' in outputs[0][0]
  assert 'recipe:' not in outputs[1][0] and 'step ' not in outputs[1][0]  # (gloo prints)
  # ... and the metrics: each logged step once, as on one process.
  def logged(workdir):
    lines = (tmp_path / workdir / 'metrics.jsonl').read_text().splitlines()
    return [(r['kind'], r['step']) for r in map(json.loads, lines)]
  assert logged('two') == logged('one') and len(logged('one')) >= 2
  leaves = [k for k in one.files if k.startswith('arr_')]
  assert len(leaves) == 10
  for k in leaves:
    np.testing.assert_array_equal(two_0[k], two_1[k])  # each process computed the same
    np.testing.assert_allclose(two_0[k], one[k], rtol=1e-5, atol=1e-6)  # and as one process
  # Sharded evaluation across processes counts each of the 101 examples once.
  assert int(two_0['count']) == int(one['count']) == 101
  assert float(two_0['precision']) == float(one['precision'])


# Through run.py and the README's flags: two processes, one CPU device each.
RUN = dict(train_split='train[:512]', eval_split='test[:64]', batch_size=32, eval_batch_size=32,
           log_every=1, eval_every=0, checkpoint_every=1000, num_train_steps=100, optimizer='sgd',
           learning_rate=0.05, input_shards=2, progress='lines',
           steps_per_dispatch=2)  # 50 dispatches: a signal lands mid-run (with 30 steps, the
                                  # 25 after step 5 took 0.5 s on a 2-core Zen 5: too close)


def start_process(process_id, port, workdir, log, *extra):
  return run_py('--workdir', str(workdir), f'--coordinator_address=127.0.0.1:{port}',
                '--num_processes=2', f'--process_id={process_id}', *as_flags(RUN), *extra,
                env={'XLA_FLAGS': None}, wait=False, stdout=open(log, 'w'),
                stderr=subprocess.STDOUT)  # one CPU device per process


def run_pair(tmp_path, name, workdir, extra=((), ())):
  port = free_port()
  logs = [tmp_path / f'{name}_{i}.log' for i in range(2)]
  return [start_process(i, port, workdir, logs[i], *extra[i]) for i in range(2)], logs


def wait_all(procs, deadline_s):
  end = time.monotonic() + deadline_s
  for p in procs:
    try:
      p.wait(timeout=max(end - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f'still running after {deadline_s} s: a hang') from None
  return [p.returncode for p in procs]


def saved_params(workdir, step):
  """The params of the checkpoint at `step` in workdir, read back in this process."""
  return jax.tree.map(np.asarray, restore(workdir, step, small_config(**RUN)).params)


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  procs, logs = run_pair(tmp_path, 'stopped', tmp_path / 'run')
  end = time.monotonic() + 300
  while 'step 5,' not in logs[0].read_text():  # SIGTERM mid-run, to process 1 only
    assert time.monotonic() < end and procs[0].poll() is None, logs[0].read_text()[-2000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  assert wait_all(procs, 120) == [0, 0], logs[0].read_text()[-2000:]
  stopped = re.search(r'stopped by a signal to another process after step (\d+); checkpoint '
                      r'written', logs[0].read_text())
  assert stopped, logs[0].read_text()[-2000:]
  step = int(stopped.group(1))
  assert 5 < step < RUN['num_train_steps']
  ckpt = checkpoint.Checkpoints(str(tmp_path / 'run'), 3, read_only=True)
  assert ckpt.steps() == [step]  # one checkpoint, at the step both processes agreed on
  ckpt.close()
  # Resumed by the same command, the run ends where an uninterrupted one does, exactly.
  resumed, logs = run_pair(tmp_path, 'resumed', tmp_path / 'run')
  whole, whole_logs = run_pair(tmp_path, 'whole', tmp_path / 'whole')
  assert wait_all(resumed + whole, 300) == [0, 0, 0, 0], logs[0].read_text()[-2000:]
  assert f'resumed from the checkpoint at step {step}' in logs[0].read_text()
  end_step = RUN['num_train_steps']
  jax.tree.map(np.testing.assert_array_equal, saved_params(tmp_path / 'run', end_step),
               saved_params(tmp_path / 'whole', end_step))


@pytest.mark.parametrize('bad,flag,message', [
    # Rejected after the processes joined (config validation), on either process:
    (0, '--config.batch_size=0', 'error: bad config: batch_size must be positive, got 0'),
    (1, '--config.batch_size=0', 'error: bad config: batch_size must be positive, got 0'),
    # A flag that does not parse, before the process would have joined:
    (1, '--config.batch_size=abc', "error: flag --config.batch_size=abc: invalid literal"),
])
def test_bad_input_on_one_process_ends_both_within_60_s(tmp_path, bad, flag, message):
  extra = [(), ()]
  extra[bad] = (flag,)
  start = time.monotonic()
  procs, logs = run_pair(tmp_path, 'bad', tmp_path / 'run', extra)
  codes = wait_all(procs, 60)
  assert all(code != 0 for code in codes), codes
  assert message in logs[bad].read_text()
  assert time.monotonic() - start < 60


PREPARE = """import sys, time
from cnnjax import workdir
while time.time() < float(sys.argv[3]):  # both start at the same instant
  pass
for i in range(int(sys.argv[2])):
  workdir.prepare(f'{sys.argv[1]}/run{i}')
"""


def test_processes_starting_together_prepare_one_workdir(tmp_path):
  """Two processes preparing the same fresh workdirs at once, 200 times in a row."""
  env = child_env({'PYTHONPATH': str(ROOT)})
  start = str(time.time() + 20)  # after both have imported cnnjax
  procs = [subprocess.Popen([sys.executable, '-c', PREPARE, str(tmp_path), '200', start],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
  assert not [f for f in tmp_path.rglob('.write-test*')]
