"""Image preprocessing on the accelerator: pure JAX, driven by PRNG keys.

The host ships uint8 batches; everything random happens here, inside the
jitted train step. Each op has the semantics of the tf.image op it names
(per image, on 0-255 float pixels, no clipping, as TF 1.x's cifar10_input).
"""
import jax
import jax.numpy as jnp
from jax import lax


def random_crop(key, images, size, width=None):
  """tf.image.random_crop to size x size (size x width): one uniform offset per image."""
  n, h, w, c = images.shape
  width = width or size
  key_y, key_x = jax.random.split(key)
  ys = jax.random.randint(key_y, (n,), 0, h - size + 1)
  xs = jax.random.randint(key_x, (n,), 0, w - width + 1)
  crop = lambda im, y, x: lax.dynamic_slice(im, (y, x, 0), (size, width, c))
  return jax.vmap(crop)(images, ys, xs)


def central_crop(images, size):
  """tf.image.resize_image_with_crop_or_pad when cropping: the centred window."""
  h, w = images.shape[1:3]
  top, left = (h - size) // 2, (w - size) // 2
  return images[:, top:top + size, left:left + size, :]


def random_flip_left_right(key, images):
  """tf.image.random_flip_left_right: each image mirrored with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


# The flip bits of alternating_flip come from fold_in(run key, this), never a step's key
# (fold_in(run key, step) for steps below it).
FLIP_KEY_DATA = 2**31 - 1


def alternating_flip(key, images, index, epoch):
  """airbench's alternating flip: each example's mirror bit is drawn once, from `key` and
  its `index` in the train split, and every odd epoch mirrors the whole set: any two
  consecutive epochs show each example both ways (half the repeats random flips give)."""
  bit = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i)))(index)
  flip = (bit != (epoch % 2 == 1)).reshape(-1, 1, 1, 1)
  return jnp.where(flip, images[:, :, ::-1, :], images)


def reflect_pad(images, pad):
  return jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')


def random_translate(key, images, pad):
  """airbench's translation: reflect-pad by `pad`, then the image's size back at a uniform
  offset, each axis's shift in [-pad, pad] drawn independently per image."""
  h, w = images.shape[1:3]
  return random_crop(key, reflect_pad(images, pad), h, w)


def tta_logits(logits_of, images, level):
  """airbench's test-time augmentation of a batch of model inputs: level 0 the logits
  alone; 1 averaged with the mirror's; 2: half that, half the mean of the same for the
  images shifted by (-1, -1) and (+1, +1) pixels (reflect-padded)."""
  if level == 0:
    return logits_of(images)
  mirrored = lambda x: 0.5 * logits_of(x) + 0.5 * logits_of(x[:, :, ::-1, :])
  if level == 1:
    return mirrored(images)
  h, w = images.shape[1:3]
  padded = reflect_pad(images, 1)
  shifted = (padded[:, :h, :w], padded[:, 2:h + 2, 2:w + 2])
  return 0.5 * mirrored(images) + 0.5 * ((mirrored(shifted[0]) + mirrored(shifted[1])) / 2)


def random_brightness(key, images, max_delta):
  """tf.image.random_brightness: adds one delta ~ U[-max_delta, max_delta) per image."""
  delta = jax.random.uniform(key, (images.shape[0], 1, 1, 1), images.dtype, -max_delta, max_delta)
  return images + delta


def random_contrast(key, images, lower, upper):
  """tf.image.random_contrast: (x - channel mean) * f + channel mean, f ~ U[lower, upper)."""
  factor = jax.random.uniform(key, (images.shape[0], 1, 1, 1), images.dtype, lower, upper)
  mean = jnp.mean(images, axis=(1, 2), keepdims=True)
  return (images - mean) * factor + mean


def per_image_standardization(images):
  """tf.image.per_image_standardization: (x - mean) / max(std, 1/sqrt(num_elements))."""
  num_elements = images.shape[1] * images.shape[2] * images.shape[3]
  mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
  std = jnp.std(images, axis=(1, 2, 3), keepdims=True)
  return (images - mean) / jnp.maximum(std, lax.rsqrt(jnp.float32(num_elements)))


def normalize(images, mean, std):
  """torchvision's Normalize on [0, 1] pixels: (x / 255 - mean) / std per channel."""
  return (images / 255.0 - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def preprocess(key, images, cfg, train, examples=None):
  """uint8 NHWC batch -> float32 model input, as the config's `augment` block says.

  cfg fields: crop_size (0 = keep size), train_crop ('random' | 'central'),
  flip, alternating_flip (flip's bits per example, alternating by epoch, instead of
  per step), translate (reflect-padded shifts up to this many pixels, 0 = off),
  brightness (max delta, 0 = off), contrast ((lower, upper) or None), scale
  ('standardize' | 'unit' for x / 255 | 'normalize' with the mean and std). Evaluation
  (train=False) takes the central crop and the scaling only, so it is deterministic and
  key-free. examples: (run key, the batch's indices in the split, epoch), which
  alternating_flip needs.
  """
  x = images.astype(jnp.float32)
  if train:
    k_crop, k_flip, k_bright, k_contrast = jax.random.split(key, 4)
    if cfg.crop_size:
      x = random_crop(k_crop, x, cfg.crop_size) if cfg.train_crop == 'random' else central_crop(x, cfg.crop_size)
    if cfg.flip and cfg.alternating_flip:
      run_key, index, epoch = examples
      x = alternating_flip(jax.random.fold_in(run_key, FLIP_KEY_DATA), x, index, epoch)
    elif cfg.flip:
      x = random_flip_left_right(k_flip, x)
    if cfg.translate:
      x = random_translate(jax.random.fold_in(k_crop, 1), x, cfg.translate)
    if cfg.brightness:
      x = random_brightness(k_bright, x, cfg.brightness)
    if cfg.contrast:
      x = random_contrast(k_contrast, x, *cfg.contrast)
  elif cfg.crop_size:
    x = central_crop(x, cfg.crop_size)
  if cfg.scale == 'standardize':
    return per_image_standardization(x)
  if cfg.scale == 'normalize':
    return normalize(x, cfg.mean, cfg.std)
  return x / 255.0
