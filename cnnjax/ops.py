"""TensorFlow-1.x numerics as pure JAX functions: LRN, SAME max-pooling, l2_loss.

Each function here claims equality with a named TensorFlow op, and
tests/test_ops.py checks the claim against TensorFlow itself, on both paths:
oneDNN's kernels on the CPU backend (cnnjax/kernels.py) and the pure-JAX
formulations below, which every other backend (and CNNJAX_CPU_KERNELS=xla) runs.
"""
import functools

import jax
import jax.numpy as jnp
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
  if kernels.enabled() and x.dtype == jnp.float32 and x.ndim == 4:
    out = kernels.lrn(x, depth_radius, bias, alpha, beta)
    if out is not None:
      return out
  return _lrn(x, depth_radius, bias, alpha, beta)


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
  (as TensorFlow's oneDNN graph rewrite fuses Conv2D + BiasAdd + Relu); elsewhere
  XLA's convolution, then the bias and ReLU.
  """
  strides = (stride, stride)
  if kernels.enabled() and x.dtype == kernel.dtype == jnp.float32 and x.ndim == 4:
    b = jnp.zeros(kernel.shape[-1], x.dtype) if bias is None else bias
    out = kernels.conv2d(x, kernel, b, strides, padding, relu)
    if out is not None:
      return out
  y = lax.conv_general_dilated(x, kernel, strides, padding,
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if bias is not None:
    y = y + bias
  return jax.nn.relu(y) if relu else y  # gradient 0 at 0, as tf.nn.relu


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
  if kernels.enabled() and x.dtype == jnp.float32:
    out = kernels.max_pool(x, window, stride, ph, pw, oh, ow)
    if out is not None:
      return out
  return _max_pool(x, window, stride, ph, pw, oh, ow)


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
  hp, wp = xp.shape[1:3]
  taken = jnp.zeros(out.shape, bool)
  grad = jnp.zeros(xp.shape, g.dtype)
  zero = jnp.array(0, g.dtype)
  for (i, j), view in _window_slices(xp, window, stride, oh, ow):
    first = (view == out) & ~taken
    taken = taken | first
    # Scatter back to the padded input: strided positions via interior padding.
    routed = jnp.where(first, g, zero)
    grad = grad + lax.pad(routed, zero, [
        (0, 0, 0),
        (i, hp - i - stride * (oh - 1) - 1, stride - 1),
        (j, wp - j - stride * (ow - 1) - 1, stride - 1),
        (0, 0, 0)])
  h, w = x.shape[1:3]
  return (grad[:, ph[0]:ph[0] + h, pw[0]:pw[0] + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
