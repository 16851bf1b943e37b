"""TensorFlow-1.x numerics as pure JAX functions: LRN, SAME max-pooling, l2_loss.

Each function here claims equality with a named TensorFlow op, and
tests/test_ops.py checks the claim against TensorFlow itself, on both paths:
oneDNN's kernels on the CPU backend (cnnjax/kernels.py) and the pure-JAX
formulations below, which every other backend (and CNNJAX_CPU_KERNELS=xla) runs.
bernoulli instead claims equality with jax.random.bernoulli, bit for bit.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax import kernels


def l2_loss(w):
  """tf.nn.l2_loss: sum(w ** 2) / 2 (no square root, halved)."""
  return jnp.sum(jnp.square(w)) / 2


def lrn(x, depth_radius=5, bias=1.0, alpha=1.0, beta=0.5):
  """tf.nn.lrn over the last (channel) axis, with TF's defaults.

  out[..., c] = x[..., c] / (bias + alpha * sum_{|c'-c| <= r} x[..., c']**2) ** beta.
  Unlike torch.nn.LocalResponseNorm, alpha is not divided by the window size.
  """
  xla = lambda x: _lrn(x, depth_radius, bias, alpha, beta)
  if kernels.enabled() and x.dtype == jnp.float32 and x.ndim == 4:
    out = kernels.lrn(x, depth_radius, bias, alpha, beta, fallback=xla)
    if out is not None:
      return out
  return xla(x)


def _channel_window_sum(v, radius):
  """sum_{|c'-c| <= radius} v[..., c']: 2r+1 shifted slices, exact (no matmul, no TF32)."""
  channels = v.shape[-1]
  padded = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(radius, radius)])
  return sum(padded[..., i:i + channels] for i in range(2 * radius + 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x, radius, bias, alpha, beta):
  return _lrn_fwd(x, radius, bias, alpha, beta)[0]


def _lrn_fwd(x, radius, bias, alpha, beta):
  d = bias + alpha * _channel_window_sum(jnp.square(x), radius)
  # exp(-beta log d) rather than d ** -beta: XLA's CPU pow is ~4x slower.
  scale = jnp.exp(-beta * jnp.log(d))
  return x * scale, (x, d, scale)


def _lrn_bwd(radius, bias, alpha, beta, residuals, g):
  # TF's LRNGrad formula. Autodiff gives the same numbers, but XLA then
  # recomputes the pow inside every slice's fusion: 9x slower on CPU.
  x, d, scale = residuals
  window = _channel_window_sum(g * x * scale / d, radius)
  return (g * scale - (2 * alpha * beta) * x * window,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def conv2d(x, kernel, bias=None, stride=1, padding='SAME', relu=False):
  """relu?(tf.nn.conv2d(x, kernel, stride, padding) + bias): NHWC input, HWIO kernel.

  On the CPU backend this is one oneDNN convolution with the bias and ReLU fused
  (as TensorFlow's oneDNN graph rewrite fuses Conv2D + BiasAdd + Relu) wherever
  cnnjax/kernels.py chooses oneDNN for its shape; elsewhere XLA's convolution, then
  the bias and ReLU.
  """
  strides = (stride, stride)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)

  def xla(x, kernel, bias):
    y = _xla_conv(x, kernel, strides, padding)
    if bias is not None:
      y = y + bias
    return jax.nn.relu(y) if relu else y  # gradient 0 at 0, as tf.nn.relu

  if kernels.enabled() and x.dtype == kernel.dtype == jnp.float32 and x.ndim == 4:
    b = jnp.zeros(kernel.shape[-1], x.dtype) if bias is None else bias
    out = kernels.conv2d(x, kernel, b, strides, padding, relu, fallback=xla)
    if out is not None:
      return out
  return xla(x, kernel, bias)


_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _plain_conv(lhs, rhs, strides, padding, **dilations):
  """XLA's convolution NHWC x HWIO -> NHWC as JAX writes it (JAX's own gradients, XLA's
  own padding)."""
  return lax.conv_general_dilated(lhs, rhs, strides, padding, **dilations, dimension_numbers=_DIMS)


def _xla_conv(x, kernel, strides, padding):
  """XLA's convolution; on the CPU backend with both gradients in Eigen's canonical form."""
  if jax.default_backend() != 'cpu':
    return _plain_conv(x, kernel, strides, padding)
  return _canonical_conv(x, kernel, strides, padding)


# XLA:CPU runs a convolution on its fast (Eigen) path only in the canonical form
# NHWC x HWIO -> NHWC; JAX's autodiff writes the kernel gradient as f01b_i01o->01bf and
# the input gradient with an OI kernel. XLA's ConvCanonicalization pass rewrites such
# convolutions into canonical ones with transposes, but only at the top level of the
# module (xla/service/cpu/conv_canonicalization.h): inside a while body (the lax.scan
# of steps_per_dispatch) or a call they stay as they are and run as XLA's naive loop,
# ~100x slower (jax-ml/jax#12868). So the gradients below are written canonical, with
# the transposes explicit: the same arithmetic, bit for bit, as a plain jitted step
# (except where a window is larger than its input: _eigen_conv).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, kernel, strides, padding):
  return _eigen_conv(x, kernel, strides, padding)


def _canonical_conv_fwd(x, kernel, strides, padding):
  return _canonical_conv(x, kernel, strides, padding), (x, kernel)


def _canonical_conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  (sh, sw), ((pt, _), (pl, _)) = strides, padding
  (_, h, w, _), (kh, kw, _, _), (_, oh, ow, _) = x.shape, kernel.shape, dy.shape
  # Input gradient: dy (dilated by the stride) correlated with the flipped kernel, its
  # in/out channels swapped.
  flipped = jnp.transpose(lax.rev(kernel, (0, 1)), (0, 1, 3, 2))
  dx = _eigen_conv(
      dy, flipped, (1, 1),
      ((kh - 1 - pt, h - 1 + pt - sh * (oh - 1)), (kw - 1 - pl, w - 1 + pl - sw * (ow - 1))),
      lhs_dilation=(sh, sw))
  # Kernel gradient: a convolution over the batch, input channels as its batch (C, H, W, N)
  # and dy as its kernel (OH, OW, N, O), dilated by the stride.
  dk = _eigen_conv(
      jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1),
      ((pt, kh + sh * (oh - 1) - h - pt), (pl, kw + sw * (ow - 1) - w - pl)),
      rhs_dilation=(sh, sw))
  return dx, jnp.transpose(dk, (1, 2, 0, 3))


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _eigen_conv(lhs, rhs, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
  """A canonical convolution that stays canonical: its input at least as large as its window.

  XLA's algebraic simplifier swaps the operands of a convolution whose window is larger
  than its input (VGG-16's 3x3 kernels on CIFAR's 2x2 maps, a 5x5 kernel on a 4x4 map),
  a form XLA:CPU then runs as its naive loop, at the top level too: ~70x slower than
  Eigen's (jaxlib 0.10.2 and 0.12.1; docs/RESULTS.md). Where the window is larger in any
  dimension (XLA swapped a 3x3 window on 2x2, not on 2x8; the copy is small either way),
  the padding (and the stride's dilation of the input gradient) is applied to the input
  first, behind a barrier that keeps XLA from folding it back into the convolution: the
  same sums, on Eigen.
  """
  window = [d * (k - 1) + 1 for d, k in zip(rhs_dilation, rhs.shape[:2])]
  size = [d * (n - 1) + 1 for d, n in zip(lhs_dilation, lhs.shape[1:3])]
  if all(k <= n for k, n in zip(window, size)):
    return _plain_conv(lhs, rhs, strides, padding, lhs_dilation=lhs_dilation,
                       rhs_dilation=rhs_dilation)
  spatial = [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)]
  padded = lax.pad(lhs, jnp.zeros((), lhs.dtype), [(0, 0, 0), *spatial, (0, 0, 0)])
  return _plain_conv(lax.optimization_barrier(padded), rhs, strides, 'VALID',
                     rhs_dilation=rhs_dilation)


def _pool_padding(size, window, stride, padding):
  """TF's (before, after) padding for one spatial axis, and the output size."""
  if padding == 'VALID':
    out = (size - window) // stride + 1
    return (0, 0), out
  if padding != 'SAME':
    raise ValueError(f'padding must be SAME or VALID, got {padding!r}')
  out = -(-size // stride)
  total = max((out - 1) * stride + window - size, 0)
  return (total // 2, total - total // 2), out  # TF puts the odd pixel after.


def max_pool(x, window, stride, padding='SAME'):
  """tf.nn.max_pool2d on NHWC input with square window and stride.

  Written as a max over window**2 strided slices, which XLA compiles far faster
  (and, on CPU, runs far faster) than reduce_window's select_and_scatter
  gradient. The custom gradient sends each output's gradient to the first
  maximum of its window in row-major order, exactly as TensorFlow does on ties.
  """
  (ph, oh), (pw, ow) = (_pool_padding(n, window, stride, padding) for n in x.shape[1:3])
  xla = lambda x: _max_pool(x, window, stride, ph, pw, oh, ow)
  if kernels.enabled() and x.dtype == jnp.float32:
    out = kernels.max_pool(x, window, stride, ph, pw, oh, ow, fallback=xla)
    if out is not None:
      return out
  return xla(x)


def _window_slices(xp, window, stride, oh, ow):
  """Yields ((i, j), view) for each window offset: view[n, y, x] = xp[n, s*y+i, s*x+j]."""
  for i in range(window):
    for j in range(window):
      yield (i, j), xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]


def _pad_neg_inf(x, ph, pw):
  neg_inf = jnp.array(-jnp.inf, x.dtype)
  return lax.pad(x, neg_inf, [(0, 0, 0), (*ph, 0), (*pw, 0), (0, 0, 0)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5, 6))
def _max_pool(x, window, stride, ph, pw, oh, ow):
  xp = _pad_neg_inf(x, ph, pw)
  return functools.reduce(jnp.maximum, (v for _, v in _window_slices(xp, window, stride, oh, ow)))


def _max_pool_fwd(x, window, stride, ph, pw, oh, ow):
  out = _max_pool(x, window, stride, ph, pw, oh, ow)
  return out, (x, out)


def _max_pool_bwd(window, stride, ph, pw, oh, ow, residuals, g):
  x, out = residuals
  xp = _pad_neg_inf(x, ph, pw)
  # Which window offset holds each output's first maximum (row-major), computed once:
  # recomputing that chain inside every scatter term made XLA's fusion 6x slower.
  first = jnp.full(out.shape, window * window, jnp.int8)
  for k, (_, view) in reversed(list(enumerate(_window_slices(xp, window, stride, oh, ow)))):
    first = jnp.where(view == out, jnp.int8(k), first)
  first = lax.optimization_barrier(first)
  zero = jnp.array(0, g.dtype)
  routed = lambda i, j: jnp.where(first == i * window + j, g, zero)
  # The scatter back, one phase at a time: padded input row stride * a + r receives the
  # rows a - m of offsets i = r + stride * m (and so for columns); the phases are then
  # interleaved. No interior padding, at most ceil(window / stride)**2 terms a pixel.
  rows, cols = -(-xp.shape[1] // stride), -(-xp.shape[2] // stride)

  n, c = x.shape[0], x.shape[3]

  def shifted(v, m, l):  # v[:, a - m, b - l] for a < rows, b < cols (0 outside)
    return lax.pad(v, zero, [(0, 0, 0), (m, rows - oh - m, 0), (l, cols - ow - l, 0), (0, 0, 0)])
  phases = [[sum((shifted(routed(r + stride * m, q + stride * l), m, l)
                  for m in range(-(-(window - r) // stride))
                  for l in range(-(-(window - q) // stride))),
                 start=jnp.zeros((n, rows, cols, c), g.dtype))
             for q in range(stride)] for r in range(stride)]
  grad = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # n, a, r, b, q, c
  grad = grad.reshape(n, rows * stride, cols * stride, c)
  h, w = x.shape[1:3]
  return (grad[:, ph[0]:ph[0] + h, pw[0]:pw[0] + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# --- random draws ---------------------------------------------------------------------------

def bernoulli(key, p, shape):
  """jax.random.bernoulli(key, p, shape) for a float p: the same draws, bit for bit.

  On the CPU backend JAX lowers threefry2x32 as a rolled loop (a while loop of five
  passes over whole arrays of counters and words), which XLA can fuse with nothing: a
  dropout mask of Recipe F's first layer (8.4 million draws) took 5.6x as long as the
  same hash written out, which XLA fuses with the select that applies the mask
  (docs/RESULTS.md). So on the CPU, for a threefry2x32 key with JAX's default
  partitionable counters, the draw is written out here: the counters (the element's
  row-major index), the hash, and jax.random.uniform's float conversion, as jax.random
  computes them. Elsewhere (another backend, PRNG or counter scheme; a scalar; 2**32
  draws or more) jax.random.bernoulli itself.
  """
  shape, words = tuple(shape), _threefry_key_words(key)
  if (words is None or jax.default_backend() != 'cpu' or not 0 < math.prod(shape) < 2**32
      or not shape or not jax.config.jax_threefry_partitionable):
    return jax.random.bernoulli(key, p, shape)
  # The element's index, low 32 bits (the high ones are 0 below 2**32 draws); summed
  # from per-axis iotas, as jax.random does, so that XLA partitions it with the batch.
  strides = np.cumprod((*shape[1:], 1)[::-1])[::-1]
  index = sum(lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
              for axis, stride in enumerate(strides))
  hi, lo = _threefry2x32(words[0], words[1], jnp.zeros(shape, jnp.uint32), index)
  bits = hi ^ lo
  # jax.random.uniform's [0, 1) float: 23 random mantissa bits under an exponent of 1.
  one = np.float32(1).view(np.uint32)
  uniform = lax.bitcast_convert_type((bits >> np.uint32(9)) | one, jnp.float32) - 1
  return uniform < np.float32(p)


def _threefry_key_words(key):
  """A threefry2x32 key's two uint32 words (typed key or raw); None for another PRNG."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key) if str(jax.random.key_impl(key)) == 'threefry2x32' else None
  return key if jax.config.jax_default_prng_impl == 'threefry2x32' else None


def _threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011), unrolled: jax.random's hash."""
  rotate = lambda v, r: (v << np.uint32(r)) | (v >> np.uint32(32 - r))
  keys = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + keys[0], x2 + keys[1]
  for i in range(5):
    for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ rotate(x2, r)
    x1 = x1 + keys[(i + 1) % 3]
    x2 = x2 + keys[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2
