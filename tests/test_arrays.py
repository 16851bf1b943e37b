"""Arrays files (run.py --mode=export): the data source of machines without TensorFlow."""
import os
import re

import numpy as np
import pytest

from cnnjax import data
from cnnjax.errors import UserError
from tests.conftest import run_py


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  path = tmp_path_factory.mktemp('arrays') / 'made' / 'cifar10_part.npz'  # a new folder
  result = run_py('--mode=export', '--out', str(path), '--config.train_split=train[:400]',
                  '--config.eval_split=test[:150]')
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == (
      f'wrote {path}: train = train[:400] (400 examples), test = test[:150] (150 examples); '
      f'train from it with --config.dataset={path}')
  return path


def test_export_writes_the_tfds_splits_exactly(exported):
  tfds_source, arrays = data.info('cifar10'), data.info(str(exported))
  assert arrays.class_names == tfds_source.class_names and arrays.num_classes == 10
  assert arrays.image_shape == tfds_source.image_shape == (32, 32, 3)
  for name, split in (('train', 'train[:400]'), ('test', 'test[:150]')):
    a, b = arrays.load(name), tfds_source.load(split)
    assert a.images.dtype == np.uint8 and a.labels.dtype == np.int32
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_dataset_and_data_dir_paths_may_start_with_a_tilde(exported, monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'data.npz').symlink_to(exported)
  (tmp_path / 'tfds').symlink_to(os.environ['TFDS_DATA_DIR'])
  arrays = data.info('~/data.npz')
  np.testing.assert_array_equal(arrays.load('test').images,
                                data.info(str(exported)).load('test').images)
  from_home = data.info('cifar10', data_dir='~/tfds', download=False)  # else not prepared
  assert from_home.builder.data_dir == data.info('cifar10').builder.data_dir.replace(
      os.environ['TFDS_DATA_DIR'], str(tmp_path / 'tfds'))


@pytest.mark.parametrize('split,rows', [
    ('train[10:20]', (10, 20)), ('train[:100]', (0, 100)), ('train[350:]', (350, 400)),
    ('train[-10:]', (390, 400)), ('train[25%:50%]', (100, 200)), ('train[-10%:]', (360, 400)),
    ('train', (0, 400))])
def test_arrays_splits_slice_as_tfds_slices_do(exported, split, rows):
  arrays = data.info(str(exported))
  part = arrays.load(split)
  assert arrays.num_examples(split) == len(part) == rows[1] - rows[0]
  np.testing.assert_array_equal(part.images, arrays.load('train').images[rows[0]:rows[1]])


def test_arrays_shards_cover_the_split_once_in_near_equal_parts(exported):
  arrays = data.info(str(exported))
  parts = [arrays.load(arrays.shard('train[:100]', i, 3)) for i in range(3)]
  assert [len(p) for p in parts] == [33, 34, 33]
  np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]),
                                arrays.load('train[:100]').labels)


def test_bad_arrays_input_is_one_line(exported, tmp_path):
  arrays = data.info(str(exported))
  with pytest.raises(UserError, match=r"bad split 'validation' .* its splits are test, train"):
    arrays.num_examples('validation')
  for empty in ('test[5:3]', 'test[:0]'):
    with pytest.raises(UserError, match=rf"bad split '{re.escape(empty)}' .* holds no examples"):
      arrays.load(empty)
  # Not a zip, a .npy under the name, an export cut short: named as not ours (np.load would
  # offer to unpickle the first and return the second's array).
  (tmp_path / 'other.npz').write_bytes(b'not an npz')
  np.save(tmp_path / 'array.npy', np.zeros(3))
  (tmp_path / 'array.npy').rename(tmp_path / 'array.npz')
  (tmp_path / 'cut.npz').write_bytes(exported.read_bytes()[:100_000])
  for name in ('other.npz', 'array.npz', 'cut.npz'):
    with pytest.raises(UserError, match=rf'^{tmp_path / name} is not an arrays file of cnnjax'):
      data.info(str(tmp_path / name))
  with pytest.raises(UserError, match='^cannot read the arrays file .*No such file'):
    data.info(str(tmp_path / 'gone.npz'))
  result = run_py('--mode=export', '--out', str(tmp_path / 'x.zip'))
  assert result.returncode == 2 and result.stderr.strip() == \
      f"error: --out must end in .npz, got '{tmp_path / 'x.zip'}'"
  under_a_file = tmp_path / 'other.npz' / 'x.npz'
  result = run_py('--mode=export', '--out', str(under_a_file))
  assert result.returncode == 2 and result.stderr.strip() == \
      f"error: --out '{under_a_file}' is not writable: {tmp_path / 'other.npz'} is a file"


def test_trains_and_evaluates_from_an_arrays_file_without_tensorflow(exported, tmp_path):
  result = run_py('--workdir', str(tmp_path / 'run'), f'--config.dataset={exported}',
                  '--config.num_train_steps=4', '--config.eval_every=0', '--config.log_every=2',
                  without_tf=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'data: cifar10 ({exported.name}) train=400 examples, test=150 examples' in result.stdout
  assert re.search(r'^step 4: precision @ 1 = \S+ \(\d+/150\)', result.stdout, re.M)
