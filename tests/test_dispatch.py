"""Many steps per dispatch and device-resident data train exactly as one step at a time
from host batches: same batches, same parameters, same logs, on 1 and 8 devices."""
import json

import jax
import pytest

from cnnjax import checkpoint, feed, loop, optim
from cnnjax.errors import UserError
from tests.conftest import (EIGHT, SMALL_RUN, as_flags, assert_same_state, recipe_config,
                             restore, run_code, run_py, small_config)

# Intervals that K = 10 does not divide: groups are cut at the checkpoint and the end.
RUN = dict(SMALL_RUN, batch_size=32, log_every=3, eval_every=0, checkpoint_every=20,
           num_train_steps=40)
VARIANTS = {'one step, host batches': dict(steps_per_dispatch=1, data_on_device='false'),
            'ten steps, host batches': dict(steps_per_dispatch=10, data_on_device='false'),
            'ten steps, data on device': dict(steps_per_dispatch=10, data_on_device='true'),
            'seven steps, data on device': dict(steps_per_dispatch=7, data_on_device='true')}


def config(**overrides):
  return small_config(**dict(RUN, **overrides))


def train_log(workdir):
  """(step, loss, cross_entropy) of every logged train step in metrics.jsonl."""
  records = map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  return [(r['step'], r['loss'], r['cross_entropy']) for r in records if r['kind'] == 'train']


def checkpoint_steps(workdir):
  ckpt = checkpoint.Checkpoints(str(workdir), 10, read_only=True)
  try:
    return ckpt.steps()
  finally:
    ckpt.close()


def test_group_end_cuts_groups_at_every_evaluation_checkpoint_and_the_end():
  c = config(steps_per_dispatch=10, eval_every=25, checkpoint_every=12, num_train_steps=57)
  groups, step = [], 0
  while step < c.num_train_steps:
    groups.append((step, loop.group_end(step, c)))
    step = groups[-1][1]
  assert {end - start for start, end in groups} == {1, c.steps_per_dispatch}  # two compiles
  ends = {end for _, end in groups}
  for every in (c.eval_every, c.checkpoint_every):
    assert set(range(every, c.num_train_steps, every)) <= ends
  assert groups[-1][1] == c.num_train_steps
  assert all(start % c.steps_per_dispatch == 0 for start, end in groups if end - start > 1)


@pytest.fixture(scope='module')
def one_device_runs(tmp_path_factory):
  runs = {}
  for name, overrides in VARIANTS.items():
    workdir = tmp_path_factory.mktemp('run')
    result = loop.train_and_evaluate(config(**overrides), str(workdir))
    runs[name] = (workdir, result)
  return runs


def test_steps_per_dispatch_and_data_on_device_train_bit_for_bit_alike(one_device_runs):
  (reference, result), *others = one_device_runs.values()
  assert result['step'] == RUN['num_train_steps']
  for workdir, other in others:
    assert_same_state(other['state'], result['state'])  # params, optimizer state, step, key
    assert other['precision'] == result['precision']
    # The seed-format log: the same steps with the same numbers.
    assert train_log(workdir) == train_log(reference)
    assert checkpoint_steps(workdir) == checkpoint_steps(reference) == [20, 40]
  assert [s for s, _, _ in train_log(reference)] == list(range(0, RUN['num_train_steps'], 3))


def test_resume_in_the_middle_of_a_dispatch_group_is_exact(tmp_path, one_device_runs):
  reference = one_device_runs['ten steps, data on device'][1]['state']
  # Stopped at 15, inside the group 10..19 an uninterrupted run dispatches at once.
  loop.train_and_evaluate(config(**VARIANTS['ten steps, data on device'], num_train_steps=15),
                          str(tmp_path))
  assert checkpoint_steps(tmp_path) == [15]
  result = loop.train_and_evaluate(config(**VARIANTS['ten steps, data on device']),
                                   str(tmp_path))
  assert_same_state(result['state'], reference)


def test_log_lines_report_each_steps_rate_and_time_their_groups_by_the_wall_clock(tmp_path):
  # Recipe C's decaying schedule, decayed every 15 steps so that 40 steps show it.
  c = recipe_config('cifar_tutorial', **dict(RUN, decay_steps=15, log_every=10,
                                             checkpoint_every=0, steps_per_dispatch=10))
  loop.train_and_evaluate(c, str(tmp_path))
  records = [r for r in map(json.loads, (tmp_path / 'metrics.jsonl').read_text().splitlines())
             if r['kind'] == 'train']
  assert [r['step'] for r in records] == [0, 10, 20, 30]
  schedule = optim.learning_rate_fn(c, 256)
  assert [r['learning_rate'] for r in records] == pytest.approx(
      [float(schedule(r['step'])) for r in records])
  assert len({r['learning_rate'] for r in records}) == 3  # it did decay
  # Each line's sec/batch is its group's: the lines are 10 such steps apart in time.
  for before, line in zip(records, records[1:]):
    assert line['wall_time'] - before['wall_time'] == pytest.approx(
        10 * line['sec_per_batch'], rel=0.3, abs=0.02)


def test_non_finite_loss_inside_a_group_names_its_step_and_saves_nothing_after(tmp_path):
  diverging = dict(optimizer='sgd', learning_rate=1e9, num_train_steps=30, checkpoint_every=0)
  messages = []
  for k in (1, 10):
    workdir = tmp_path / f'k{k}'
    with pytest.raises(UserError, match=r'loss is (nan|inf) at step \d+; stopped without') as e:
      loop.train_and_evaluate(config(**diverging, steps_per_dispatch=k), str(workdir))
    messages.append(str(e.value))
    assert not (workdir / 'checkpoints').exists() or checkpoint_steps(workdir) == []
  assert messages[0] == messages[1]  # the first bad step, wherever it falls in a group


def test_auto_puts_the_data_on_devices_that_report_room_for_it(monkeypatch):
  trainer = loop.Trainer(config())
  shards, mesh = trainer.train_data, trainer.mesh
  assert isinstance(trainer.feed, feed.HostFeed)  # the CPU reports no memory size
  need = feed.Layout.of(shards, jax.local_device_count()).bytes_per_device(shards)
  assert need == 256 * (32 * 32 * 3 + 4)  # train[:256], one device: uint8 images, int32 labels
  monkeypatch.setattr(feed, '_device_memory', lambda: int(need / feed.DEVICE_MEMORY_FRACTION))
  assert isinstance(feed.make('auto', shards, 0, mesh), feed.DeviceFeed)
  monkeypatch.setattr(feed, '_device_memory', lambda: int(need / feed.DEVICE_MEMORY_FRACTION) - 1)
  assert isinstance(feed.make('auto', shards, 0, mesh), feed.HostFeed)
  assert isinstance(feed.make('true', shards, 0, mesh), feed.DeviceFeed)


class FakeGpu:
  """A device as jax 0.10-0.12 shows a GPU: memory_stats() with PJRT's allocator fields."""
  def __init__(self, bytes_limit):
    self.bytes_limit = bytes_limit

  def memory_stats(self):
    return {'bytes_in_use': 1 << 20, 'bytes_limit': self.bytes_limit, 'bytes_reserved': 0,
            'largest_alloc_size': 1 << 20, 'num_allocs': 7, 'peak_bytes_in_use': 1 << 20,
            'pool_bytes': self.bytes_limit, 'peak_pool_bytes': self.bytes_limit}


def test_auto_follows_the_memory_a_gpu_reports(monkeypatch):
  trainer = loop.Trainer(config())
  shards, mesh = trainer.train_data, trainer.mesh
  need = feed.Layout.of(shards, jax.local_device_count()).bytes_per_device(shards)
  real = jax.local_devices()
  def report(*limits):  # one fake device per real one, through the real _device_memory
    monkeypatch.setattr(feed.jax, 'local_devices', lambda: [FakeGpu(l) for l in limits])
  h200 = 150_000_000_000  # what an H200 reports, about 139.7 GiB
  report(h200)
  made = feed.make('auto', shards, 0, mesh)
  assert isinstance(made, feed.DeviceFeed) and '139.7 GiB' in made.description
  report(int(need / feed.DEVICE_MEMORY_FRACTION) - 1)  # too small to hold it
  assert isinstance(feed.make('auto', shards, 0, mesh), feed.HostFeed)
  report(h200, int(need / feed.DEVICE_MEMORY_FRACTION) - 1)  # the smallest device decides
  assert isinstance(feed.make('auto', shards, 0, mesh), feed.HostFeed)
  report(-1)  # a plugin that leaves the field unset
  made = feed.make('auto', shards, 0, mesh)
  assert isinstance(made, feed.HostFeed) and 'reports no memory size' in made.description
  monkeypatch.setattr(feed.jax, 'local_devices', lambda: real)
  assert feed._device_memory() is None  # this CPU: memory_stats() is None


@pytest.mark.parametrize('field, value, message', [
    ('data_on_device', 'yes', "data_on_device must be 'auto', 'true' or 'false', got 'yes'"),
    ('steps_per_dispatch', 0, 'steps_per_dispatch must be positive, got 0')])
def test_bad_dispatch_settings_are_one_line_errors(tmp_path, field, value, message):
  result = run_py('--workdir', str(tmp_path), f'--config.{field}={value}')
  assert result.returncode == 2 and result.stderr.strip() == f'error: bad config: {message}'


# Every layout of shards on 8 devices: devices sharing a shard (1, 2, 4 shards), one each
# (8), several each (16); steps across an epoch boundary (256 / 32 = 8 steps an epoch).
SAME_BATCHES = '''
import jax, numpy as np
from cnnjax import data, feed, parallel
from tests.conftest import small_config
c = small_config(train_split='train[:256]', batch_size=32)
source = data.info(c.dataset)
mesh = parallel.make_mesh()
for num_shards in (1, 2, 4, 8, 16):
  shards = data.load_train(source, c.train_split, c.batch_size, num_shards, 0, 1)
  host = feed.HostFeed(shards, c.seed, mesh)
  device = feed.DeviceFeed(shards, c.seed, mesh, feed.Layout.of(shards, 8))
  gather = jax.jit(parallel.scoped(mesh, lambda data, rows: jax.lax.map(
      lambda r: device.fetch(data, r), rows)))
  for start, end in ((0, 3), (6, 10)):
    a = host.inputs(start, end)
    b = gather(device.data, device.inputs(start, end))
    assert a['image'].shape == b['image'].shape == (end - start, 32, 32, 32, 3)
    for k in ('image', 'label'):
      assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), (num_shards, start, k)
      assert [s.data.shape[0] for s in b[k].addressable_shards] == [end - start] * 8
  print(num_shards, 'shards: same batches;', device.layout.block, 'examples per device')
'''


def test_device_resident_data_gives_the_host_batches_on_eight_devices():
  result = run_code(SAME_BATCHES, env=EIGHT)
  assert result.returncode == 0, result.stderr[-3000:]
  blocks = dict(line.split(' shards: same batches;') for line in result.stdout.splitlines())
  # Each device holds only the shards its rows come from.
  assert {k: int(v.split()[0]) for k, v in blocks.items()} == {
      '1': 256, '2': 128, '4': 64, '8': 32, '16': 32}


def test_eight_devices_train_alike_with_any_dispatch_and_feed(tmp_path):
  overrides = dict(RUN, optimizer='sgd', learning_rate=0.05)
  finals = []
  for name in ('one step, host batches', 'ten steps, data on device'):
    workdir = tmp_path / name.replace(' ', '_').replace(',', '')
    result = run_py('--workdir', str(workdir), *as_flags({**overrides, **VARIANTS[name]}),
                    env=EIGHT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'devices: 8 x cpu' in result.stdout
    finals.append((train_log(workdir), restore(workdir, RUN['num_train_steps'],
                                               config(**overrides))))
  (log_a, state_a), (log_b, state_b) = finals
  assert log_a == log_b
  assert_same_state(state_a, state_b)
