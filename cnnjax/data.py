"""The host side of the input pipeline: a dataset -> uint8 numpy batches.

A dataset is a TFDS one (config.dataset = its name: downloaded by TFDS where it can be,
read with tf.data) or an arrays file written by `run.py --mode=export` (config.dataset =
its path, *.npz: numpy only, for machines without TensorFlow). Both are a `Source`.

Nothing random happens on the host but the epoch shuffle, and that is a pure
function of (seed, epoch): the batch for any step can be recomputed, so resume
needs no iterator state. Augmentation runs on the accelerator (augment.py).
"""
import dataclasses
import functools
import os
import re
import socket
import zipfile

import numpy as np

from cnnjax.errors import UserError, first_line


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8, N x H x W x C
  labels: np.ndarray  # int32, N

  def __len__(self):
    return len(self.labels)


def _not_empty(n, split, name):
  """n, the size of `split`, where it holds examples (TFDS's metadata gives test[5:3] -2)."""
  if n <= 0:
    raise UserError(f'bad split {split!r} for {name}: it holds no examples')
  return n


def _builder(name, data_dir):
  import tensorflow_datasets as tfds
  try:
    # TFDS expands ~ in TFDS_DATA_DIR but not in the data_dir it is given.
    return tfds.builder(name, data_dir=data_dir and os.path.expanduser(data_dir))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f'unknown dataset {name!r}: {first_line(e)}') from None


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
    if _offline():
      raise ConnectionError(f'cannot reach {PROBE_HOST}')
    builder.download_and_prepare()
  except Exception as e:  # network errors come in many types; all mean the same here
    raise UserError(f'dataset {name} is not prepared in {builder.data_dir} and downloading it '
                    f'failed ({type(e).__name__}); offline? {where}.') from None


PROBE_HOST = 'storage.googleapis.com'  # TFDS's own bucket; reachable whenever downloads are


def _offline():
  """True when the network is plainly unreachable: offline, TFDS would retry for minutes."""
  if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
    return False  # only the proxy can tell
  try:
    socket.create_connection((PROBE_HOST, 443), timeout=10).close()
    return False
  except OSError:
    return True


class TfdsSource:
  """A prepared TFDS dataset; splits in TFDS's syntax ('train[:512]', 'test[10%:]')."""

  def __init__(self, builder):
    self.builder, self.name = builder, builder.name
    features = builder.info.features
    if 'image' not in features or 'label' not in features:
      raise UserError(f'dataset {self.name!r} has no image/label features; cnnjax trains '
                      'image classifiers')
    self.class_names = list(features['label'].names)
    self.num_classes = features['label'].num_classes
    self.image_shape = tuple(features['image'].shape)

  def num_examples(self, split):
    """The size of `split` (slices too) from TFDS's metadata, without reading it."""
    try:
      n = self.builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise UserError(f'bad split {split!r} for {self.name}: {first_line(e)}') from None
    return _not_empty(n, split, self.name)

  def load(self, split, limit=None):
    """The whole `split` (its first `limit` examples) as uint8 arrays in memory."""
    import tensorflow as tf
    self.num_examples(split)  # a bad or empty split's one-line error, before tf.data's
    try:
      ds = self.builder.as_dataset(split=split, shuffle_files=False)
    except ValueError as e:
      raise UserError(f'bad split {split!r} for {self.name}: {first_line(e)}') from None
    if limit is not None:
      ds = ds.take(limit)
    # Not converted by autograph, which would write the function's source to a file in the
    # temp folder and leave it there when the process ends at once (run.py's leave()).
    pair = tf.autograph.experimental.do_not_convert(lambda ex: (ex['image'], ex['label']))
    ds = ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE)
    images, labels = [], []
    try:
      for x, y in ds.batch(4096).prefetch(2).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    except tf.errors.OpError as e:  # a file cut short or damaged (DataLossError, say)
      reason = re.sub(r'\s*\[Op:.*', '', e.message.split('}}')[-1]).strip()  # tf.data's op
      raise UserError(f'cannot read split {split!r} of {self.name} in {self.builder.data_dir} '
                      f'({type(e).__name__}: {reason}); its files may be damaged: prepare '
                      'it again') from None
    return Split(np.concatenate(images), np.concatenate(labels).astype(np.int32))

  def shard(self, split, index, count):
    """The split instruction for part `index` of `count` near-equal parts of `split`."""
    import tensorflow_datasets as tfds
    return tfds.even_splits(split, n=count)[index] if count > 1 else split


ARRAYS_SUFFIX = '.npz'
_SLICE = re.compile(r'^(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?$')


class ArraysSource:
  """An arrays file (`run.py --mode=export`): uint8 images and int32 labels per split, the
  class names and the dataset's name, read with numpy alone. Splits: a name, or a slice
  of one in TFDS's syntax with example counts or percentages ('train[:512]', 'test[-10%:]')."""

  def __init__(self, path):
    not_arrays = UserError(f'{path} is not an arrays file of cnnjax (run.py --mode=export '
                           'writes one)')
    try:
      with open(path, 'rb') as file:
        # Only a zip is an .npz: np.load would return a .npy's array, or refuse anything else
        # by offering to unpickle it.
        if not zipfile.is_zipfile(file):
          raise not_arrays
        file.seek(0)
        with np.load(file) as f:
          arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise UserError(f'cannot read the arrays file {path}: {e}') from None
    self.splits = {k[:-len('/images')]: Split(arrays[k], arrays[k[:-len('images')] + 'labels'])
                   for k in arrays if k.endswith('/images')}
    if not self.splits or 'class_names' not in arrays:
      raise not_arrays
    self.name = f'{arrays["name"]} ({os.path.basename(path)})'
    self.class_names = [str(n) for n in arrays['class_names']]
    self.num_classes = len(self.class_names)
    self.image_shape = next(iter(self.splits.values())).images.shape[1:]

  def _range(self, split):
    """(split name, start, stop) of a split or slice."""
    m = _SLICE.match(split.replace(' ', ''))
    if not m or m.group(1) not in self.splits:
      raise UserError(f'bad split {split!r} for {self.name}: its splits are '
                      f'{", ".join(sorted(self.splits))}, or slices of them such as '
                      f'{next(iter(self.splits))}[:100]')
    n = len(self.splits[m.group(1)])
    def bound(text, default):
      if not text:
        return default
      value = int(text.rstrip('%'))
      return round(value * n / 100) if text.endswith('%') else value
    start, stop, _ = slice(bound(m.group(2), 0), bound(m.group(3), n)).indices(n)
    return m.group(1), start, max(start, stop)

  def num_examples(self, split):
    _, start, stop = self._range(split)
    return _not_empty(stop - start, split, self.name)

  def load(self, split, limit=None):
    name, start, stop = self._range(split)
    _not_empty(stop - start, split, self.name)  # as TFDS: an empty split is an error
    if limit is not None:
      stop = min(stop, start + limit)
    whole = self.splits[name]
    return Split(whole.images[start:stop], whole.labels[start:stop].astype(np.int32))

  def shard(self, split, index, count):
    name, start, stop = self._range(split)
    bounds = np.linspace(start, stop, count + 1).round().astype(int)
    return f'{name}[{bounds[index]}:{bounds[index + 1]}]'


def export(source, splits, path):
  """Writes `splits` of `source` ({name in the file: split of source}) as an arrays file:
  what a machine without TensorFlow or TFDS trains from (config.dataset = path)."""
  arrays = {'name': np.array(source.name), 'class_names': np.array(source.class_names)}
  for name, split in splits.items():
    part = source.load(split)
    arrays[f'{name}/images'], arrays[f'{name}/labels'] = part.images, part.labels
  tmp = f'{path}.tmp.npz'
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:  # a failed write leaves no partial file behind
    if os.path.exists(tmp):
      os.remove(tmp)
  return {name: len(arrays[f'{name}/labels']) for name in splits}


def info(name, data_dir=None, download=True):
  """The Source of config.dataset: an arrays file (a path ending in .npz), else the TFDS
  dataset of that name, prepared (downloaded) if needed."""
  if name.endswith(ARRAYS_SUFFIX):
    return ArraysSource(os.path.expanduser(name))
  builder = _builder(name, data_dir)
  _prepare(builder, name, download)
  return TfdsSource(builder)


@functools.lru_cache(maxsize=8)
def _permutation(n, seed, epoch, shard_id):
  return np.random.default_rng([seed, epoch, shard_id]).permutation(n)


@dataclasses.dataclass(frozen=True)
class TrainShards:
  """This process's shards of the train split, and the order they are read in.

  The split is cut into `num_shards` near-equal parts; each epoch every shard is
  shuffled by (seed, epoch, shard id), and the global batch of a step is the
  concatenation, in shard order, of `batch_size / num_shards` examples from each.
  So the order is a pure function of (seed, num_shards, step): any process
  count that divides num_shards reads the same batches, each process reading
  only its own shards.
  """
  shards: tuple  # of Split, this process's
  ids: tuple  # their shard ids
  shard_batch: int
  steps_per_epoch: int
  index_stride: int = 0  # example j of shard i has the index i * index_stride + j

  def index(self, rows, local_shards=None):
    """The indices (unique in the split: augment.alternating_flip's) of the examples at
    `rows` of each of this process's shards (of `local_shards` of them: positions in
    self.shards), concatenated in shard order."""
    local_shards = range(len(self.ids)) if local_shards is None else local_shards
    return np.concatenate([self.ids[i] * self.index_stride + np.asarray(r)
                           for i, r in zip(local_shards, rows)]).astype(np.int32)

  def rows(self, seed, step):
    """For each of this process's shards, the positions in it of its examples in `step`'s
    batch (remainders dropped per epoch)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    return [_permutation(len(sh), seed, epoch, sid)[i * self.shard_batch:(i + 1) * self.shard_batch]
            for sh, sid in zip(self.shards, self.ids)]

  def batch(self, seed, step):
    """This process's part of the global batch for `step`, in shard order."""
    rows = self.rows(seed, step)
    parts = list(zip(self.shards, rows))
    return {'image': np.concatenate([sh.images[idx] for sh, idx in parts]),
            'label': np.concatenate([sh.labels[idx] for sh, idx in parts]),
            'index': self.index(rows)}


def steps_per_epoch(num_examples, batch_size, num_shards):
  """Whole batches in an epoch of the train split read as `num_shards` shards (each
  shard's remainder is dropped per epoch)."""
  return (num_examples // num_shards) // (batch_size // num_shards)


def load_train(source, split, batch_size, num_shards, process_index, process_count):
  """This process's TrainShards (config.validate has checked the numbers fit)."""
  total = source.num_examples(split)
  shard_batch = batch_size // num_shards
  per_process = num_shards // process_count
  ids = tuple(range(process_index * per_process, (process_index + 1) * per_process))
  shards = tuple(source.load(source.shard(split, i, num_shards)) for i in ids)
  return TrainShards(shards, ids, shard_batch, steps_per_epoch(total, batch_size, num_shards),
                     total // num_shards + 1)


def eval_batches(split, batch_size, num_batches=None):
  """Fixed-shape batches over the split in order; padding rows have mask 0.

  `num_batches` (default: enough for the split) lets every process run the same
  number of batches when their parts of the eval split differ in size.
  """
  if num_batches is None:
    num_batches = -(-len(split) // batch_size)
  for b in range(num_batches):
    images = split.images[b * batch_size:(b + 1) * batch_size]
    labels = split.labels[b * batch_size:(b + 1) * batch_size]
    pad = batch_size - len(labels)
    mask = np.concatenate([np.ones(len(labels), bool), np.zeros(pad, bool)])
    if pad:
      images = np.concatenate([images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
      labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    yield {'image': images, 'label': labels, 'mask': mask}
