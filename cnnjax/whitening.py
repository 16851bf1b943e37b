"""A frozen patch-whitening convolution fitted from the train split (Recipe G, airbench's
first layer): the eigenvectors of the covariance of the images' size x size patches,
each scaled by 1 / sqrt(its eigenvalue + eps), and their negations, as conv filters.

A pure function of the images it is given: fitted from the first examples of the train
split (in split order, not the shuffled order), it is the same on every process and on
every resume. Computed on the host in float64: the smallest eigenvalues of natural
images' patch covariance are ~1e-4 of the largest, so their directions move by percents
with float32's summation order (two compilations of the same fit differed by 8%).
"""
import numpy as np

CHUNK = 256  # images per partial covariance (float64 patches: ~25 MB for CIFAR)


def patches(images, size):
  """Every size x size patch of NHWC images, flattened in (row, column, channel) order
  (an HWIO filter's order): (N * (H - size + 1) * (W - size + 1), size * size * C)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  rows = [images[:, i:h - size + 1 + i, j:w - size + 1 + j, :]
          for i in range(size) for j in range(size)]
  return np.stack(rows, axis=3).reshape(-1, size * size * c)


def filters(images, size=2, eps=5e-4):
  """float32 HWIO filters (size, size, C, 2 * size * size * C) of NHWC float images: the
  whitening directions, largest eigenvalue first, then the same negated (so a following
  GELU-like activation keeps both signs of each component)."""
  images = np.asarray(images, np.float64)
  c = images.shape[-1]
  covariance, count = 0.0, 0
  for start in range(0, len(images), CHUNK):
    p = patches(images[start:start + CHUNK], size)
    covariance, count = covariance + p.T @ p, count + len(p)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance / count)  # uncentred, as airbench's
  eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # largest first
  scaled = eigenvectors / np.sqrt(eigenvalues + eps)  # column k: direction k
  both = np.concatenate([scaled, -scaled], axis=1)
  return both.reshape(size, size, c, -1).astype(np.float32)
