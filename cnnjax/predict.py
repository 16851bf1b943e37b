"""--mode=predict: classify image files with a run's latest checkpoint.

predict(workdir, images) is the same from Python. Each image is read with Pillow,
converted to the dataset's channels (RGB or grayscale), resized to the dataset's
image size when it differs (Lanczos: Pillow's ANTIALIAS, with which seed 004's
inference resizes to 32x32), then given the recipe's evaluation preprocessing and
model (EMA weights when the recipe keeps them).
"""
import os

import jax
import numpy as np

from cnnjax import checkpoint, data, parallel, state as state_lib, train, workdir as workdir_lib
from cnnjax.report import log
from cnnjax.errors import UserError, typed_line


def load_image(path, size, channels):
  """An image file as uint8 size x size x channels."""
  from PIL import Image, UnidentifiedImageError
  if os.path.isdir(path):
    raise UserError(f'image {path!r} is a folder: give its image files '
                    f'({os.path.join(path, "*.png")}, say)')
  try:
    with Image.open(path) as image:
      image = image.convert('RGB' if channels == 3 else 'L')
      if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
      pixels = np.asarray(image, dtype=np.uint8)
  except FileNotFoundError:
    raise UserError(f'image {path!r} does not exist') from None
  except (UnidentifiedImageError, OSError) as e:
    raise UserError(f'cannot read image {path!r}: {typed_line(e)}') from None
  return pixels.reshape(*size, channels)


class Predictor:
  """A run's latest checkpoint, ready to classify uint8 images."""

  def __init__(self, workdir, config=None):
    config = config or workdir_lib.require_saved_config(workdir)
    spec, self.names = _dataset(config, workdir)
    self.size, self.channels = tuple(spec.image_shape[:2]), spec.image_shape[2]
    if None in self.size:
      raise UserError(f'{config.dataset} has images of varying size; predict needs a fixed one')
    self.batch_size = config.eval_batch_size
    if not os.path.isdir(workdir_lib.checkpoints_dir(workdir)):
      raise UserError(f'no checkpoints in {workdir}: train first, or point --workdir at a run')
    run = state_lib.build(config, spec, parallel.make_mesh(), initial=False)
    ckpt = checkpoint.Checkpoints(workdir, config.keep_checkpoints, read_only=True)
    try:
      self.step, self.state = ckpt.restore_latest(run.state, report=log)
    finally:
      ckpt.close()
    if self.step is None:
      raise UserError(f'no checkpoint in {workdir}: train first, or point --workdir at a run')
    self._probabilities = run.jit(lambda state, images: jax.nn.softmax(train.eval_logits(
        state, images, augment_cfg=config.augment.lock())))

  def probabilities(self, images):
    """Class probabilities (N x classes) of uint8 N x H x W x C images of the dataset's size.

    In batches of eval_batch_size from data.eval_batches, as evaluation runs (a thousand
    224 x 224 photos through VGG-16 in one batch would need tens of GiB), the last padded to
    that size so that any N compiles once; fewer images than that go as one batch of their
    own.
    """
    images = np.asarray(images, np.uint8)
    size = min(len(images), self.batch_size)
    if not size:
      return np.zeros((0, len(self.names)), np.float32)
    unlabelled = data.Split(images, np.zeros(len(images), np.int32))
    return np.concatenate([
        np.asarray(self._probabilities(self.state, batch['image']))[batch['mask']]
        for batch in data.eval_batches(unlabelled, size)])

  def top_k(self, images, k=3):
    """Per image, the k most probable (class name, probability), most probable first."""
    probs = self.probabilities(images)
    order = np.argsort(-probs, axis=1, kind='stable')[:, :k]
    return [[(self.names[c], float(p[c])) for c in row] for p, row in zip(probs, order)]


def _dataset(config, workdir):
  """(DataSpec, class names) of the run's dataset: from the workdir's dataset.json, which
  the run wrote, so no data is read or downloaded; else (a run from before that file, or a
  config of another dataset) from the dataset itself."""
  saved = workdir_lib.saved_dataset(config, workdir)
  if saved:
    names = saved['class_names']
    return state_lib.DataSpec(len(names), tuple(saved['image_shape']), saved['num_train']), names
  source = data.info(config.dataset, config.data_dir, config.download)
  return state_lib.DataSpec.of(source, config.train_split), source.class_names


def predict(workdir, paths, k=3, config=None):
  """Top-k (class name, probability) for each image file, with workdir's latest checkpoint.

  config: the run's config; by default the config.json the run wrote in workdir.
  """
  predictor = Predictor(workdir, config)
  images = np.stack([load_image(p, predictor.size, predictor.channels) for p in paths])
  return predictor.top_k(images, k)


def run(workdir, paths, k, config=None):
  """--mode=predict: prints, per image, its top-k classes with probabilities."""
  if not paths:
    raise UserError('--mode=predict needs image files: --images a.png b.jpg ...')
  if k < 1:
    raise UserError(f'--top_k must be positive, got {k}')
  for path, top in zip(paths, predict(workdir, paths, k, config)):
    log(f'{path}: ' + ', '.join(f'{name} {p:.1%}' for name, p in top))
