import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'tensorflow_datasets'

# Real data for tests comes from ../shared, as for CI; an explicit TFDS_DATA_DIR wins.
if 'TFDS_DATA_DIR' not in os.environ and SHARED_DATA.is_dir():
  os.environ['TFDS_DATA_DIR'] = str(SHARED_DATA)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@pytest.fixture(scope='session')
def tf():
  import tensorflow
  tensorflow.config.set_visible_devices([], 'GPU')
  return tensorflow


def small_config(**overrides):
  """Recipe A on small real slices: fast enough for a test, real enough to learn."""
  from configs import cifar_lrn
  c = cifar_lrn.get_config()
  c.train_split, c.eval_split = 'train[:512]', 'test[:300]'
  c.batch_size, c.eval_batch_size = 64, 128  # 300 = 2 * 128 + 44: a padded last batch
  c.update(overrides)
  return c
