"""A frozen patch-whitening convolution fitted from the train split (Recipe G, airbench's
first layer): the eigenvectors of the covariance of the images' size x size patches,
each scaled by 1 / sqrt(its eigenvalue + eps), and their negations, as conv filters.

A pure function of the images it is given: fitted from the first examples of the train
split (in split order, not the shuffled order), it is the same on every process and on
every resume.
"""
import jax.numpy as jnp


def patches(images, size):
  """Every size x size patch of NHWC float images, flattened in (row, column, channel)
  order (an HWIO filter's order): (N * (H - size + 1) * (W - size + 1), size * size * C)."""
  n, h, w, c = images.shape
  rows = [images[:, i:h - size + 1 + i, j:w - size + 1 + j, :]
          for i in range(size) for j in range(size)]
  return jnp.stack(rows, axis=3).reshape(-1, size * size * c)


def filters(images, size=2, eps=5e-4):
  """HWIO filters (size, size, C, 2 * size * size * C): the whitening directions, largest
  eigenvalue first, then the same negated (so a following ReLU-like activation keeps both
  signs of each component)."""
  c = images.shape[-1]
  p = patches(images.astype(jnp.float32), size)
  covariance = p.T @ p / p.shape[0]  # uncentred, as airbench's
  eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)  # ascending
  eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
  scaled = eigenvectors / jnp.sqrt(eigenvalues + eps)  # column k: direction k
  both = jnp.concatenate([scaled, -scaled], axis=1)
  return both.reshape(size, size, c, -1)
