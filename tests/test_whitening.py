"""The patch-whitening layer (cnnjax/whitening.py) against a direct eigendecomposition."""
import jax
import numpy as np

from cnnjax import whitening


def test_filters_are_the_scaled_eigenvectors_of_the_patch_covariance():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(20, 8, 8, 3)).astype(np.float32) * [1.0, 2.0, 0.5]
  eps = 5e-4
  w = np.asarray(whitening.filters(images, size=2, eps=eps))
  assert w.shape == (2, 2, 3, 24)
  # Direct: every 2x2 patch by loops, flattened (row, column, channel).
  p = np.array([images[n, i:i + 2, j:j + 2, :].reshape(-1)
                for n in range(20) for i in range(7) for j in range(7)], np.float64)
  values, vectors = np.linalg.eigh(p.T @ p / len(p))
  flat = w.reshape(12, 24)
  np.testing.assert_allclose(flat[:, 12:], -flat[:, :12])
  for k in range(12):  # largest first; an eigenvector's sign is free
    expected = vectors[:, ::-1][:, k] / np.sqrt(values[::-1][k] + eps)
    got = flat[:, k]
    np.testing.assert_allclose(got * np.sign(got @ expected), expected, rtol=1e-5, atol=1e-6)


def test_the_layer_whitens_the_patches_it_was_fitted_on():
  rng = np.random.default_rng(1)
  mix = rng.normal(size=(3, 3))
  images = (rng.normal(size=(50, 10, 10, 3)) @ mix).astype(np.float32)
  w = whitening.filters(images, size=2, eps=0.0)
  out = jax.lax.conv_general_dilated(images, w, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  z = np.asarray(out, np.float64).reshape(-1, 24)[:, :12]
  np.testing.assert_allclose(z.T @ z / len(z), np.eye(12), atol=2e-3)
