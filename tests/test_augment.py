"""Augmentation: TF equality where TF is deterministic, behaviour where it is random."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import augment
from cnnjax.config import base_config, validate
from cnnjax.errors import UserError


def images(n=16, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_per_image_standardization_matches_tf(tf):
  x = images().astype(np.float32)
  x[0] = 7.0  # constant image: TF divides by 1/sqrt(N), not by std 0
  expected = tf.image.per_image_standardization(x).numpy()
  np.testing.assert_allclose(augment.per_image_standardization(jnp.asarray(x)), expected,
                             rtol=1e-5, atol=1e-5)


def test_central_crop_matches_tf_resize_with_crop_or_pad(tf):
  x = images()
  expected = tf.image.resize_with_crop_or_pad(x, 24, 24).numpy()
  np.testing.assert_array_equal(augment.central_crop(jnp.asarray(x), 24), expected)


def test_random_crop_takes_sub_windows_with_varied_offsets():
  x = images(n=64)
  out = np.asarray(augment.random_crop(jax.random.PRNGKey(0), jnp.asarray(x), 24))
  assert out.shape == (64, 24, 24, 3)
  offsets = set()
  for img, crop in zip(x, out):
    found = [(y, z) for y in range(9) for z in range(9)
             if np.array_equal(img[y:y + 24, z:z + 24], crop)]
    assert found, 'a crop must be a 24x24 window of its own image'
    offsets.add(found[0])
  assert len(offsets) > 20  # 81 possible offsets; 64 draws hit many


def test_random_flip_mirrors_about_half_and_leaves_the_rest():
  x = jnp.asarray(images(n=200))
  out = np.asarray(augment.random_flip_left_right(jax.random.PRNGKey(1), x))
  flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, np.asarray(x))]
  same = [np.array_equal(o, i) for o, i in zip(out, np.asarray(x))]
  assert all(f or s for f, s in zip(flipped, same))
  assert 70 < sum(flipped) < 130


def test_random_brightness_adds_one_bounded_delta_per_image():
  x = jnp.asarray(images(n=100), jnp.float32)
  delta = np.asarray(augment.random_brightness(jax.random.PRNGKey(2), x, 63.0) - x)
  per_image = delta.reshape(100, -1)
  np.testing.assert_allclose(per_image, per_image[:, :1] * np.ones_like(per_image), atol=1e-4)
  assert np.all(np.abs(per_image[:, 0]) <= 63.0)
  assert per_image[:, 0].std() > 20  # spread over the range, not a constant


def test_random_contrast_scales_deviation_from_channel_mean():
  x = jnp.asarray(images(n=50), jnp.float32)
  out = np.asarray(augment.random_contrast(jax.random.PRNGKey(3), x, 0.2, 1.8))
  mean = np.asarray(x).mean(axis=(1, 2), keepdims=True)
  factor = (out - mean)[:, 5, 5, 0] / (np.asarray(x) - mean)[:, 5, 5, 0]
  np.testing.assert_allclose(out, (np.asarray(x) - mean) * factor[:, None, None, None] + mean,
                             rtol=1e-4, atol=1e-3)
  assert np.all((factor >= 0.2 - 1e-4) & (factor <= 1.8 + 1e-4))
  assert factor.std() > 0.2


@pytest.mark.parametrize('brightness,contrast', [
    (-1.0, (0.2, 1.8)), (63.0, (1.8, 0.2)), (63.0, (1.0, 1.0)), (63.0, (-0.5, 1.0)),
    (0.0, (0.0, 0.5))])
def test_brightness_and_contrast_ranges_are_refused_where_tf_refuses_them(
    tf, brightness, contrast):
  x = images(n=2).astype(np.float32)
  try:
    tf.image.random_contrast(tf.image.random_brightness(x, brightness), *contrast)
    tf_refuses = False
  except ValueError:
    tf_refuses = True
  config = base_config()
  config.augment.brightness, config.augment.contrast = brightness, contrast
  try:
    validate(config)
    refused = False
  except UserError as e:
    assert str(e).startswith('bad config: augment.')
    refused = True
  assert refused == tf_refuses


def test_train_preprocess_shape_determinism_and_variation():
  cfg = base_config().augment
  x = jnp.asarray(images())
  a = augment.preprocess(jax.random.PRNGKey(0), x, cfg, train=True)
  b = augment.preprocess(jax.random.PRNGKey(0), x, cfg, train=True)
  c = augment.preprocess(jax.random.PRNGKey(1), x, cfg, train=True)
  assert a.shape == (16, 24, 24, 3) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # Standardized: every image has mean 0 and std 1.
  np.testing.assert_allclose(np.asarray(a).mean(axis=(1, 2, 3)), 0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(a).std(axis=(1, 2, 3)), 1, atol=1e-3)


def test_eval_preprocess_is_the_deterministic_central_crop(tf):
  cfg = base_config().augment
  x = images()
  out = augment.preprocess(None, jnp.asarray(x), cfg, train=False)
  expected = tf.image.per_image_standardization(
      tf.image.resize_with_crop_or_pad(tf.cast(x, tf.float32), 24, 24)).numpy()
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_recipe_b_trains_on_the_central_crop(tf):
  """Recipe B's training crop is resize_image_with_crop_or_pad (seed 002), not random:
  its config's train-mode preprocessing, with the random colour ops switched off, is
  TF's central crop + standardization of every image."""
  from tests.conftest import recipe_config
  cfg = recipe_config('cifar_cookbook').augment
  assert cfg.train_crop == 'central' and cfg.crop_size
  with cfg.unlocked():
    cfg.update(dict(flip=False, brightness=0.0, contrast=()))
  x = images()
  out = augment.preprocess(jax.random.PRNGKey(0), jnp.asarray(x), cfg, train=True)
  expected = tf.image.per_image_standardization(tf.image.resize_with_crop_or_pad(
      tf.cast(x, tf.float32), cfg.crop_size, cfg.crop_size)).numpy()
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_unit_scale_without_crop_is_pixels_over_255():
  from tests.conftest import recipe_config
  cfg = recipe_config('mnist_cnn').augment
  x = images(size=28)
  out = augment.preprocess(jax.random.PRNGKey(0), jnp.asarray(x), cfg, train=True)
  np.testing.assert_allclose(out, x / 255.0, rtol=1e-6)
