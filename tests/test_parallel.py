"""Data parallelism on 8 fake CPU devices (XLA_FLAGS in a subprocess) against 1 device."""
import re

import jax
import numpy as np
import pytest

from cnnjax import checkpoint, data, kernels, parallel, state as state_lib
from tests import conftest
from tests.conftest import EIGHT, SMALL_RUN, as_flags, recipe_config, run_code, run_py, small_config

# SGD: equal gradients give equal updates (Adam would magnify float noise in tiny gradients).
# 100 test examples in batches of 16 = 8 devices x 2: the last batch is padded and masked.
OVERRIDES = dict(SMALL_RUN, batch_size=32, eval_batch_size=16, log_every=1, eval_every=0,
                 checkpoint_every=0, num_train_steps=4, optimizer='sgd', learning_rate=0.05)
FLAGS = as_flags(OVERRIDES)
ONE_PATH = conftest.one_kernel_path()


def run(workdir, *args, env=None):
  return run_py('--workdir', str(workdir), *FLAGS, *args, env={**ONE_PATH, **(env or {})})


def final_eval(stdout):
  return re.search(r'^step \d+: precision @ 1 = .*$', stdout, re.M).group(0)


def restore(workdir, step):
  """Restores on this (1-device) process, whatever device count saved it."""
  return conftest.restore(workdir, step, small_config(**OVERRIDES))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  one, eight = tmp_path_factory.mktemp('one'), tmp_path_factory.mktemp('eight')
  return {'one': (one, run(one)), 'eight': (eight, run(eight, env=EIGHT))}


def test_eight_devices_train_like_one(runs):
  (one, r1), (eight, r8) = runs['one'], runs['eight']
  assert r1.returncode == 0 and r8.returncode == 0, r1.stderr + r8.stderr
  assert re.search(r'^devices: 1 x ', r1.stdout, re.M)
  assert re.search(r'^devices: 8 x ', r8.stdout, re.M)
  assert re.findall(r'^step (\d), loss = (\S+)', r1.stdout, re.M) == \
      re.findall(r'^step (\d), loss = (\S+)', r8.stdout, re.M)
  # The console reports examples/sec for the whole global batch of 32 on both.
  for out in (r1.stdout, r8.stdout):
    rates = re.findall(r'^step \d, loss = \S+ \((\S+) examples/sec; (\S+) sec/batch\)', out, re.M)
    assert len(rates) == 4
    for examples_per_sec, sec_per_batch in rates:
      # Both printed rounded, as the seeds print them (%.1f, %.3f): some batch time gives both.
      # (A 5% match failed at 7.4 ms a batch, printed 0.007; the first step takes a second.)
      rate, seconds = float(examples_per_sec), float(sec_per_batch)
      assert 32 / (rate + 0.05) - 0.0005 <= seconds <= 32 / (rate - 0.05) + 0.0005
  # Saved on 8 devices, restored on 1.
  a, b = restore(one, 4), restore(eight, 4)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_sharded_evaluation_counts_exactly_and_matches_one_device(runs):
  (_, r1), (_, r8) = runs['one'], runs['eight']
  assert '(' in final_eval(r1.stdout) and '/100)' in final_eval(r1.stdout)
  assert final_eval(r1.stdout) == final_eval(r8.stdout)


def test_checkpoint_from_one_device_restores_on_eight(runs):
  one, r1 = runs['one']
  again = run_py('--mode=eval', '--workdir', str(one), config=None, env={**EIGHT, **ONE_PATH})
  assert again.returncode == 0, again.stderr
  assert re.search(r'^devices: 8 x ', again.stdout, re.M)
  assert final_eval(again.stdout) == final_eval(r1.stdout)


VGG = dict(train_split='train[:64]', eval_split='test[:20]', batch_size=16, eval_batch_size=16,
           num_train_steps=2, log_every=1, eval_every=0, checkpoint_every=0, learning_rate=0.01)


def relative_error(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.linalg.norm(x - y) / np.linalg.norm(x)


def test_batch_norm_and_dropout_on_eight_devices_train_like_one(tmp_path):
  # VGG-16: batch-norm statistics of the global batch, dropout masks drawn for the
  # global batch, so the device count changes only float summation order. But these two
  # steps' updates are not a smooth function of rounding: moving every initial weight by
  # one float32 ulp on one device moves the second loss between the same two values the
  # device count does (3.764052 and 3.763938 on jax 0.12.1) and a layer's update by up to
  # 3.5e-2, as much as 8 devices do (benchmarks/vgg_device_rounding.py, docs/RESULTS.md).
  # Traced there: one ReLU input of 4.4 million, -7e-7 on 1 device and +2e-6 on 8, decides
  # whether its max-pool window's gradient flows; with it moved, 1.9e-4 is left.
  # Mixing the two CPU paths differed by 8e-3 (jax 0.10.2), so both runs take XLA's. A
  # wrong reduction is off by order 1 (a missing gradient average: 7x; per-device
  # statistics over 2 images, or one dropout mask per device: most of the update). So
  # compare each layer's update (not the params, which barely move in 2 steps) by norm,
  # at 0.15.
  config = recipe_config('cifar_vgg16', **VGG)
  initial = state_lib.build(config, state_lib.DataSpec.of(data.info(config.dataset),
                                                          config.train_split),
                            parallel.make_mesh()).state
  states = []
  for name, env in (('one', {}), ('eight', EIGHT)):
    result = run_py('--workdir', str(tmp_path / name), *as_flags(VGG),
                    config='configs/cifar_vgg16.py', env={**env, 'CNNJAX_CPU_KERNELS': 'xla'})
    assert result.returncode == 0, result.stderr
    ckpt = checkpoint.Checkpoints(str(tmp_path / name), 3, read_only=True)
    states.append(ckpt.restore(2, initial))
    ckpt.close()
  one, eight = states
  assert jax.tree.leaves(one.batch_stats)  # the recipe has batch norm
  updates = [jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s.params, initial.params)
             for s in (one, eight)]
  flat = jax.tree_util.tree_flatten_with_path(updates[0])[0]
  checked = 0
  for (path, u1), u8 in zip(flat, jax.tree.leaves(updates[1]), strict=True):
    if jax.tree_util.keystr(path) == "['fc1']['bias']":
      continue  # feeds batch norm, so its true gradient is 0: its update is pure rounding
    assert relative_error(u1, u8) < 0.15, jax.tree_util.keystr(path)
    checked += 1
  assert checked > 40
  for x, y in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats)):
    assert relative_error(x, y) < 1e-3


def test_batch_that_does_not_divide_the_devices_is_one_line(tmp_path):
  result = run(tmp_path, '--config.batch_size=36', env=EIGHT)
  assert result.returncode == 2
  assert result.stderr.strip() == ('error: bad config: batch_size=36 does not divide evenly across 8 '
                                   'devices; use a multiple of 8')


PER_DEVICE_CHECK = '''
import re, sys
from cnnjax import bench, kernels
from tests.conftest import small_config
s = bench.Synthetic(small_config(batch_size=32))
hlo = s.compiled_text()
calls = re.findall(r'= (\\(?f32\\[\\d+)[^=]*? custom-call\\(.*custom_call_target="(cnnjax_\\w+)"', hlo)
print(kernels.describe())
for shape, target in calls:
  print(target, shape.lstrip('(f32['))
'''


def test_onednn_calls_run_per_device_on_eight_devices():
  # The custom calls are opaque to XLA's partitioner: without shard_map it would gather
  # the whole batch onto every device. Each call must see its device's 32 / 8 = 4 images.
  if not kernels.available():
    pytest.skip(kernels.describe())
  result = run_code(PER_DEVICE_CHECK, env={**EIGHT, 'CNNJAX_CPU_KERNELS': 'onednn'})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('oneDNN'), lines[0]
  decided = [line.strip() for line in lines if line.startswith('  ')]
  # Every op of Recipe A decided for its per-device batch of 4; LRN takes XLA's path
  # where oneDNN has only its reference kernel (AVX2).
  assert sorted(d.split()[0] for d in decided) == ['conv2d'] * 2 + ['lrn'] + ['max_pool'] * 2
  assert all(d.split()[1].startswith('4x') for d in decided), decided
  lrn_on_onednn = any(d.startswith('lrn') and ': oneDNN,' in d for d in decided)
  calls = [line.split() for line in lines[len(decided) + 1:]]
  forward = [batch for target, batch in calls if target in ('cnnjax_conv_fwd', 'cnnjax_lrn_fwd',
                                                             'cnnjax_max_pool_fwd')]
  assert len(forward) == 2 + 2 + (2 if lrn_on_onednn else 0), calls  # Recipe A: two of each
  assert set(forward) == {'4'}, calls
  assert {target for target, _ in calls} >= {'cnnjax_conv_bwd_data', 'cnnjax_conv_bwd_weights',
                                             'cnnjax_max_pool_bwd'}
