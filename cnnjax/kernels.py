"""oneDNN kernels for the CPU backend: convolution, max pooling and LRN as XLA FFI calls.

On the CPU, XLA's convolutions and our pure-JAX LRN and max-pool gradients cost
about 2.5x what TensorFlow's oneDNN kernels do (docs/RESULTS.md). The C++ in
csrc/onednn_ffi.cc runs oneDNN's primitives on XLA's own buffers inside the
jitted step (typed XLA FFI: no host callback, no copies); here each becomes a
JAX function with a custom VJP, and runs per device under `shard_map` so data
parallelism partitions it like any other op.

CNNJAX_CPU_KERNELS=auto (default) uses them when the backend is the CPU and the
library loaded; =xla always takes XLA's path; =onednn insists (an error if the
library is missing). GPUs always take XLA's path. The numerics equal XLA's path
and TensorFlow's to float32 rounding (tests/test_ops.py, tests/test_fidelity.py).
"""
import contextlib
import ctypes
import functools
import glob
import importlib.machinery
import importlib.metadata
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cnnjax.errors import UserError

MODES = ('auto', 'onednn', 'xla')
YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def _keep_xla_convolutions_off_ynnpack():
  """Where XLA's own CPU convolutions run (CNNJAX_CPU_KERNELS=xla, no extension), use its
  Eigen path: jaxlib 0.10 sends them to YNNPACK by default, which made Recipe A's step
  1.25x slower on this project's machines (docs/RESULTS.md). Set before the CPU backend
  starts (cnnjax is imported first); a user's own choice of the flag wins."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {YNN_FLAG}'.strip()


_keep_xla_convolutions_off_ynnpack()
_HERE = os.path.dirname(os.path.abspath(__file__))
_mode = os.environ.get('CNNJAX_CPU_KERNELS', 'auto')


def _dnnl_library():
  """libdnnl.so.3 as installed by the onednn-cpu-gomp wheel (in the environment's lib/)."""
  try:
    files = importlib.metadata.files('onednn-cpu-gomp') or []
  except importlib.metadata.PackageNotFoundError:
    return None
  paths = [str(f.locate()) for f in files if f.name == 'libdnnl.so.3']
  return os.path.abspath(paths[0]) if paths else None


def _load():
  """(ctypes library, None) or (None, the reason it is unavailable)."""
  # Loading oneDNN first (globally) lets our library's dependency on it resolve.
  dnnl = _dnnl_library()
  if dnnl is None:
    return None, 'the onednn-cpu-gomp package is not installed'
  try:
    ctypes.CDLL(dnnl, mode=ctypes.RTLD_GLOBAL)
  except OSError as e:
    return None, f'cannot load {dnnl}: {e}'
  built = [path for suffix in importlib.machinery.EXTENSION_SUFFIXES
           for path in glob.glob(os.path.join(_HERE, '_onednn' + suffix))]
  if not built:
    return None, 'the oneDNN extension was not built; see the install notes in README.md'
  try:
    return ctypes.CDLL(built[0]), None
  except OSError as e:
    return None, f'cannot load {built[0]}: {e}'


_lib, _unavailable = _load()
if _lib is not None:
  for _target, _symbol in (('cnnjax_conv_fwd', 'CnnjaxConvForward'),
                           ('cnnjax_conv_bwd_data', 'CnnjaxConvBackwardData'),
                           ('cnnjax_conv_bwd_weights', 'CnnjaxConvBackwardWeights'),
                           ('cnnjax_max_pool_fwd', 'CnnjaxMaxPoolForward'),
                           ('cnnjax_max_pool_bwd', 'CnnjaxMaxPoolBackward'),
                           ('cnnjax_lrn_fwd', 'CnnjaxLrnForward'),
                           ('cnnjax_lrn_bwd', 'CnnjaxLrnBackward')):
    jax.ffi.register_ffi_target(_target, jax.ffi.pycapsule(getattr(_lib, _symbol)),
                                platform='cpu')
  _lib.cnnjax_max_pool_workspace_bytes.restype = ctypes.c_int64
  _lib.cnnjax_max_pool_workspace_bytes.argtypes = [ctypes.c_int64] * 12
  _lib.cnnjax_lrn_workspace_bytes.restype = ctypes.c_int64
  _lib.cnnjax_lrn_workspace_bytes.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_float] * 3
  _lib.cnnjax_conv_impl_name.argtypes = [ctypes.c_int64] * 7 + [ctypes.c_char_p, ctypes.c_int64]


def available():
  return _lib is not None


def _check_mode():
  if _mode not in MODES:
    raise UserError(f'CNNJAX_CPU_KERNELS={_mode!r} is not one of {", ".join(MODES)}')
  if _lib is None and _mode == 'onednn':
    raise UserError(f'CNNJAX_CPU_KERNELS=onednn, but {_unavailable}')


def enabled():
  """Whether ops take the oneDNN path now (decided when a function is traced)."""
  _check_mode()
  return _mode != 'xla' and _lib is not None and jax.default_backend() == 'cpu'


@contextlib.contextmanager
def using(mode):
  """Temporarily set the mode (tests; jit caches do not see it: trace anew inside)."""
  global _mode
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  previous, _mode = _mode, mode
  try:
    yield
  finally:
    _mode = previous


def describe():
  """One line for the start of a run: which kernels the CPU backend uses, and why."""
  _check_mode()
  if jax.default_backend() != 'cpu':
    return f'XLA ({jax.default_backend()} backend)'
  if _mode == 'xla':
    return 'XLA (CNNJAX_CPU_KERNELS=xla)'
  if _lib is None:
    return f'XLA ({_unavailable})'
  buf = ctypes.create_string_buffer(64)
  _lib.cnnjax_conv_impl_name(128, 12, 12, 64, 5, 5, 64, buf, 64)
  return f'oneDNN via XLA FFI (convolution: {buf.value.decode()})'


# --- per-device partitioning ------------------------------------------------------------

def _per_device(fn, in_specs, out_specs, batch):
  """fn under shard_map over the context mesh's 'batch' axis (or fn on a single device).

  None where it cannot be partitioned that way (no mesh but several devices, a mesh
  without a 'batch' axis over all its devices, or a batch that does not split evenly,
  e.g. model.init's one-example batch on 8 devices): the caller then takes XLA's path.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn if jax.device_count() == 1 else None
  if mesh.size == 1:
    return fn
  if mesh.shape.get('batch') != mesh.size or batch % mesh.size:
    return None
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _attrs(**values):
  return {k: np.int64(v) if isinstance(v, int) else np.float32(v) for k, v in values.items()}


# --- convolution ---------------------------------------------------------------------------

def conv2d(x, w, b, strides, padding, relu=False):
  """relu?(conv(x, w) + b) of NHWC x HWIO float32 through oneDNN; None where it cannot run here.

  padding: 'SAME', 'VALID' or ((top, bottom), (left, right)), as lax.conv_general_dilated.
  The bias add and the ReLU run inside oneDNN's convolution (a post-op).
  """
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
  geometry = (tuple(strides), tuple(tuple(p) for p in padding), bool(relu))
  run = _per_device(lambda *a: _conv(*a, geometry), (P('batch'), P(), P()), P('batch'),
                    x.shape[0])
  return None if run is None else run(x, w, b)


def _conv_attrs(geometry):
  (sh, sw), ((pt, pb), (pl, pr)), _ = geometry
  return _attrs(sh=sh, sw=sw, pt=pt, pl=pl, pb=pb, pr=pr)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv(x, w, b, geometry):
  (sh, sw), ((pt, pb), (pl, pr)), relu = geometry
  (n, h, wd, _), (kh, kw, _, o) = x.shape, w.shape
  out = jax.ShapeDtypeStruct((n, (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1, o),
                             jnp.float32)
  return jax.ffi.ffi_call('cnnjax_conv_fwd', out)(x, w, b, relu=np.int64(relu),
                                                  **_conv_attrs(geometry))


def _conv_fwd(x, w, b, geometry):
  y = _conv(x, w, b, geometry)
  return y, (x, w, y if geometry[2] else None)


def _conv_bwd(geometry, residuals, dy):
  x, w, y = residuals
  if y is not None:  # the fused ReLU's gradient
    dy = jnp.where(y > 0, dy, 0.0)
  attrs = _conv_attrs(geometry)
  # Two calls, so XLA drops the input gradient where nothing uses it (the first layer).
  dx = jax.ffi.ffi_call('cnnjax_conv_bwd_data', jax.ShapeDtypeStruct(x.shape, jnp.float32))(
      dy, w, **attrs)
  dw, db = jax.ffi.ffi_call('cnnjax_conv_bwd_weights',
                            (jax.ShapeDtypeStruct(w.shape, jnp.float32),
                             jax.ShapeDtypeStruct(w.shape[3:], jnp.float32)))(x, dy, **attrs)
  return dx, dw, db


_conv.defvjp(_conv_fwd, _conv_bwd)


# --- max pooling --------------------------------------------------------------------------

def max_pool(x, window, stride, ph, pw, oh, ow):
  """Square-window max pool of NHWC float32 through oneDNN; None where it cannot run here.

  ph, pw: (before, after) padding (ignored by the max, as TF's SAME); oh, ow: output size.
  """
  geometry = (window, stride, tuple(ph), tuple(pw), oh, ow)
  run = _per_device(lambda a: _max_pool(a, geometry), (P('batch'),), P('batch'), x.shape[0])
  return None if run is None else run(x)


def _pool_attrs(geometry):
  window, stride, (pt, pb), (pl, pr), _, _ = geometry
  return _attrs(k=window, s=stride, pt=pt, pl=pl, pb=pb, pr=pr)


def _pool_forward(x, geometry):
  window, stride, (pt, pb), (pl, pr), oh, ow = geometry
  n, h, w, c = x.shape
  ws_bytes = _lib.cnnjax_max_pool_workspace_bytes(n, h, w, c, oh, ow, window, stride,
                                                  pt, pl, pb, pr)
  if ws_bytes < 0:
    raise ValueError(f'oneDNN cannot max-pool {x.shape} with {geometry}')
  out = (jax.ShapeDtypeStruct((n, oh, ow, c), jnp.float32),
         jax.ShapeDtypeStruct((ws_bytes,), jnp.uint8))
  return jax.ffi.ffi_call('cnnjax_max_pool_fwd', out)(x, **_pool_attrs(geometry))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, geometry):
  return _pool_forward(x, geometry)[0]


def _max_pool_fwd(x, geometry):
  y, workspace = _pool_forward(x, geometry)
  return y, (workspace, x.shape)


def _max_pool_bwd(geometry, residuals, dy):
  workspace, x_shape = residuals
  dx = jax.ffi.ffi_call('cnnjax_max_pool_bwd', jax.ShapeDtypeStruct(x_shape, jnp.float32))(
      dy, workspace, **_pool_attrs(geometry))
  return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# --- LRN across channels ------------------------------------------------------------------

def lrn(x, depth_radius, bias, alpha, beta):
  """tf.nn.lrn of NHWC float32 through oneDNN; None where it cannot run here."""
  # oneDNN divides alpha by the window size n = 2r + 1; TF does not.
  size = 2 * depth_radius + 1
  params = (size, float(alpha) * size, float(beta), float(bias))
  run = _per_device(lambda a: _lrn(a, params), (P('batch'),), P('batch'), x.shape[0])
  return None if run is None else run(x)


def _lrn_attrs(params):
  size, alpha, beta, k = params
  return _attrs(size=size, alpha=alpha, beta=beta, k=k)


def _lrn_forward(x, params):
  n, h, w, c = x.shape
  ws_bytes = _lib.cnnjax_lrn_workspace_bytes(n, h, w, c, *params)
  if ws_bytes < 0:
    raise ValueError(f'oneDNN cannot compute LRN of {x.shape} with {params}')
  out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((ws_bytes,), jnp.uint8))
  return jax.ffi.ffi_call('cnnjax_lrn_fwd', out)(x, **_lrn_attrs(params))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lrn(x, params):
  return _lrn_forward(x, params)[0]


def _lrn_fwd(x, params):
  y, workspace = _lrn_forward(x, params)
  return y, (x, workspace)


def _lrn_bwd(params, residuals, dy):
  x, workspace = residuals
  dx = jax.ffi.ffi_call('cnnjax_lrn_bwd', jax.ShapeDtypeStruct(x.shape, jnp.float32))(
      x, dy, workspace, **_lrn_attrs(params))
  return (dx,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)
