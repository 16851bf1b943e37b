"""Two local processes joined by jax.distributed on 127.0.0.1, against one process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT

OVERRIDES = ['train_split=train[:256]', 'eval_split=test[:101]', 'batch_size=32',
             'eval_batch_size=16', 'log_every=1', 'eval_every=0', 'checkpoint_every=2',
             'num_train_steps=4', 'optimizer=sgd', 'learning_rate=0.05', 'input_shards=2']


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(num_processes, process_id, port, workdir, out):
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  return subprocess.Popen(
      [sys.executable, 'tests/multiprocess_worker.py', f'127.0.0.1:{port}', str(num_processes),
       str(process_id), str(workdir), str(out), *OVERRIDES],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_train_like_one(tmp_path):
  port = free_port()
  procs = [start(2, i, port, tmp_path / 'two', tmp_path / f'two_{i}.npz') for i in range(2)]
  single = start(1, 0, free_port(), tmp_path / 'one', tmp_path / 'one.npz')
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
    np.testing.assert_array_equal(two_0[k], two_1[k])  # identical on both processes
    np.testing.assert_allclose(two_0[k], one[k], rtol=1e-5, atol=1e-6)  # and as one process
  # Sharded evaluation across processes counts each of the 101 examples once.
  assert int(two_0['count']) == int(one['count']) == 101
  assert float(two_0['precision']) == float(one['precision'])
