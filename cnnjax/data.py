"""The host side of the input pipeline: TFDS -> uint8 numpy batches.

Nothing random happens on the host but the epoch shuffle, and that is a pure
function of (seed, epoch): the batch for any step can be recomputed, so resume
needs no iterator state. Augmentation runs on the accelerator (augment.py).
"""
import dataclasses
import functools

import numpy as np

from cnnjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8, N x H x W x C
  labels: np.ndarray  # int32, N

  def __len__(self):
    return len(self.labels)


def _builder(name, data_dir):
  import tensorflow_datasets as tfds
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f'unknown dataset {name!r}: {str(e).splitlines()[0]}') from None


def _prepare(builder, name, download):
  """Makes sure the data is on disk; TFDS downloads it when it can."""
  if builder.is_prepared():
    return
  where = ('Point TFDS_DATA_DIR or --config.data_dir at a directory holding a prepared '
           f'{name} (e.g. ../shared/tensorflow_datasets)')
  if not download:
    raise UserError(f'dataset {name} is not prepared in {builder.data_dir} and '
                    f'config.download is False. {where}.')
  try:
    builder.download_and_prepare()
  except Exception as e:  # network errors come in many types; all mean the same here
    raise UserError(f'dataset {name} is not prepared in {builder.data_dir} and downloading it '
                    f'failed ({type(e).__name__}); offline? {where}.') from None


def info(name, data_dir=None, download=True):
  """The TFDS builder for `name`, prepared (downloaded) if needed."""
  builder = _builder(name, data_dir)
  _prepare(builder, name, download)
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise UserError(f'dataset {name!r} has no image/label features; cnnjax trains image classifiers')
  return builder


def num_examples(builder, split):
  """The size of `split` (slices too) from TFDS's metadata, without reading it."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise UserError(f'bad split {split!r} for {builder.name}: {e}') from None


def load(builder, split):
  """The whole `split` (TFDS split syntax, e.g. 'train[:512]') as uint8 arrays in memory."""
  import tensorflow as tf
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except ValueError as e:
    raise UserError(f'bad split {split!r} for {builder.name}: {e}') from None
  ds = ds.map(lambda ex: (ex['image'], ex['label']), num_parallel_calls=tf.data.AUTOTUNE)
  images, labels = [], []
  for x, y in ds.batch(4096).prefetch(2).as_numpy_iterator():
    images.append(x)
    labels.append(y)
  return Split(np.concatenate(images), np.concatenate(labels).astype(np.int32))


@functools.lru_cache(maxsize=2)
def _permutation(n, seed, epoch):
  return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n, batch_size):
  return n // batch_size


def train_batch(split, batch_size, seed, step):
  """The batch for `step`: epoch-wise shuffles, each epoch's remainder dropped."""
  per_epoch = steps_per_epoch(len(split), batch_size)
  epoch, i = divmod(step, per_epoch)
  idx = _permutation(len(split), seed, epoch)[i * batch_size:(i + 1) * batch_size]
  return {'image': split.images[idx], 'label': split.labels[idx]}


def eval_batches(split, batch_size):
  """Fixed-shape batches over the split in order; the last is zero-padded with mask 0."""
  for start in range(0, len(split), batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    pad = batch_size - len(labels)
    mask = np.concatenate([np.ones(len(labels), bool), np.zeros(pad, bool)])
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield {'image': images, 'label': labels, 'mask': mask}
