"""oneDNN kernels for the CPU backend: convolution, max pooling and LRN as XLA FFI calls.

On the CPU, XLA's convolutions and our pure-JAX LRN and max-pool gradients cost
about 2.5x what TensorFlow's oneDNN kernels do (docs/RESULTS.md). The C++ in
csrc/onednn_ffi.cc runs oneDNN's primitives on XLA's own buffers inside the
jitted step (typed XLA FFI: no host callback, no copies); here each becomes a
JAX function with a custom VJP, and runs per device under `shard_map` so data
parallelism partitions it like any other op.

Which of the two paths runs an op is decided per op and shape (cnnjax/kernel_choice.py):
never oneDNN where its implementation is a reference one, else the faster of the two
as measured on this machine. CNNJAX_CPU_KERNELS=auto (default) does that where the
backend is the CPU and the library loaded; =onednn takes oneDNN wherever it has an
optimized kernel, unmeasured (an error if the library is missing); =xla always takes
XLA's path. GPUs always take XLA's path. The numerics equal XLA's path and
TensorFlow's to float32 rounding (tests/test_ops.py, tests/test_fidelity.py).
"""
import contextlib
import ctypes
import functools
import glob
import importlib.machinery
import importlib.metadata
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cnnjax import cpu, kernel_choice
from cnnjax.errors import UserError

MODES = ('auto', 'onednn', 'xla')
YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
# What the installed jaxlib must know for YNN_FLAG to parse (XLA aborts on a flag it does not).
YNN_FLAG_NEEDS = (b'xla_cpu_experimental_ynn_fusion_type',
                  b'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')


def cpu_is_the_backend():
  """Whether JAX will run on the CPU, as far as can be known before it starts a backend:
  JAX_PLATFORMS names the CPU first, or is unset and no accelerator plugin is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return not any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu'))


def jaxlib_knows(needles):
  """Whether the installed jaxlib's XLA (its largest shared library) holds every string of
  `needles`: a flag's name and values, before XLA would parse them (mmap: ~10 ms)."""
  import mmap
  import jaxlib
  libraries = glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), '*.so'))
  if not libraries:
    return False
  with open(max(libraries, key=os.path.getsize), 'rb') as f:
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
      return all(m.find(needle) >= 0 for needle in needles)


def _keep_xla_convolutions_off_ynnpack():
  """Where XLA's own CPU convolutions run (CNNJAX_CPU_KERNELS=auto or xla, no extension),
  use its Eigen path: with YNNPACK's, jaxlib 0.10.2's default, Recipe A's step on XLA's
  path is 1.44x and E's 1.56x as slow; on jaxlib 0.12.0.1, E's 1.36x, A's and D's 0.96x
  (benchmarks/xla_cpu_flags.py; docs/RESULTS.md). Set before the CPU backend starts
  (cnnjax is imported first), where the CPU is the backend (the caller checks) and the
  installed jaxlib knows the flag; a user's own choice of the flag wins. Returns whether
  it was set."""
  flags = os.environ.get('XLA_FLAGS', '')
  if ('xla_cpu_experimental_ynn_fusion_type' in flags or _mode == 'onednn'
      or not jaxlib_knows(YNN_FLAG_NEEDS)):
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {YNN_FLAG}'.strip()
  return True


_mode = os.environ.get('CNNJAX_CPU_KERNELS', 'auto')
if cpu_is_the_backend():
  _keep_xla_convolutions_off_ynnpack()
  cpu.keep_freed_memory()  # every dispatch would page-fault fresh buffers otherwise
_HERE = os.path.dirname(os.path.abspath(__file__))


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
  _lib.cnnjax_conv_impls.argtypes = [ctypes.c_int64] * 16 + [ctypes.c_char_p, ctypes.c_int64]
  _lib.cnnjax_max_pool_impls.argtypes = [ctypes.c_int64] * 12 + [ctypes.c_char_p, ctypes.c_int64]
  _lib.cnnjax_lrn_impls.argtypes = ([ctypes.c_int64] * 5 + [ctypes.c_float] * 3
                                    + [ctypes.c_char_p, ctypes.c_int64])


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
  """Temporarily set the mode. The mode is read when a function is traced and jit caches
  do not see it, so only a function jitted inside is sure to use it: the tests' fixtures
  and state.build's init (a new jitted function each time) do that. A run's mode is
  CNNJAX_CPU_KERNELS, read once at import."""
  global _mode
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  previous, _mode = _mode, mode
  try:
    yield
  finally:
    _mode = previous


# oneDNN's dnnl_cpu_isa_t values (oneapi/dnnl/dnnl_types.h) and their names.
_ISA_NAMES = {0x1: 'sse41', 0x3: 'avx', 0x7: 'avx2', 0xf: 'avx2_vnni', 0x1f: 'avx2_vnni_2',
              0x27: 'avx512_core', 0x67: 'avx512_core_vnni', 0xe7: 'avx512_core_bf16',
              0x1ef: 'avx512_core_fp16', 0xfef: 'avx512_core_amx', 0x1fef: 'avx512_core_amx_fp16'}


class _Version(ctypes.Structure):  # dnnl_version_t
  _fields_ = [('major', ctypes.c_int), ('minor', ctypes.c_int), ('patch', ctypes.c_int),
              ('hash', ctypes.c_char_p), ('cpu_runtime', ctypes.c_uint),
              ('gpu_runtime', ctypes.c_uint)]


@functools.cache
def onednn_build():
  """'oneDNN 3.2.0 (ISA avx512_core)': the library's version and the ISA it compiles for
  (the CPU's widest, or ONEDNN_MAX_CPU_ISA's cap)."""
  dnnl = ctypes.CDLL(_dnnl_library())
  dnnl.dnnl_version.restype = ctypes.POINTER(_Version)
  v = dnnl.dnnl_version().contents
  isa = dnnl.dnnl_get_effective_cpu_isa()
  return f'oneDNN {v.major}.{v.minor}.{v.patch} (ISA {_ISA_NAMES.get(isa, hex(isa))})'


# The revision of cnnjax/ops.py's XLA formulations, in the cache key: raised when a change
# makes one faster, so that choices measured against the old one are measured again
# (2: convolutions whose window is larger than their input padded first, ops._eigen_conv).
XLA_FORMULATIONS = 2


@functools.cache
def machine():
  """What makes a kernel's speed here: the key of the cached kernel choices (the CPU, the
  two libraries' versions, oneDNN's ISA, XLA's CPU flags: its ISA cap, YNNPACK's use;
  cnnjax's own XLA formulations)."""
  import jaxlib
  xla_cpu_flags = sorted(f for f in os.environ.get('XLA_FLAGS', '').split()
                         if f.startswith('--xla_cpu_'))
  return (f'{cpu.model()}; {cpu.cores()} cores; {onednn_build()}; jaxlib {jaxlib.__version__}'
          f'; XLA flags: {" ".join(xla_cpu_flags) or "none"}'
          f'; cnnjax XLA formulations {XLA_FORMULATIONS}')


def describe():
  """Where the CPU backend's ops run and why: a line, then one per op decided so far."""
  _check_mode()
  if jax.default_backend() != 'cpu':
    return f'XLA ({jax.default_backend()} backend)'
  if _mode == 'xla':
    return 'XLA (CNNJAX_CPU_KERNELS=xla)'
  if _lib is None:
    return f'XLA ({_unavailable})'
  how = ('oneDNN wherever it has an optimized kernel (CNNJAX_CPU_KERNELS=onednn)'
         if _mode == 'onednn' else
         f'oneDNN or XLA per op, the faster on this machine (cache: {kernel_choice.cache_path()})')
  lines = [f'{how}; {onednn_build()}; {cpu.describe()}']
  return '\n'.join(lines + [f'  {d.line()}' for d in kernel_choice.made(_mode)])


def _impls(function, *args):
  """oneDNN's implementation names for an op's primitives, forward first; ['ref:none']
  where oneDNN cannot build them (XLA's path then runs)."""
  buf = ctypes.create_string_buffer(512)
  if function(*args, buf, len(buf)) != 0:
    return ['ref:none']
  return buf.value.decode().split(';')


def _onednn_chosen(op, impls, onednn, xla, shapes):
  """Whether oneDNN runs `op` (kernel_choice.decide)."""
  return kernel_choice.decide(op, _mode, impls, onednn, xla, shapes, machine()).path == 'onednn'


def _dims(shape):
  return 'x'.join(map(str, shape))


# --- per-device partitioning ------------------------------------------------------------

def _per_device(fn, in_specs, out_specs, batch):
  """(fn under shard_map over the context mesh's 'batch' axis (the run's: parallel.scoped
  puts it there while its steps are traced), or fn on a single device; the batch one
  device sees).

  (None, batch) where it cannot be partitioned that way (no mesh but several devices, a
  mesh without a 'batch' axis over all its devices, or a batch that does not split
  evenly, e.g. model.init's one-example batch on 8 devices): the caller then takes XLA's path.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (fn if jax.device_count() == 1 else None), batch
  if mesh.size == 1:
    return fn, batch
  if mesh.shape.get('batch') != mesh.size or batch % mesh.size:
    return None, batch
  return (jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False),
          batch // mesh.size)


def _attrs(**values):
  return {k: np.int64(v) if isinstance(v, int) else np.float32(v) for k, v in values.items()}


# --- convolution ---------------------------------------------------------------------------

def conv2d(x, w, b, strides, padding, relu, fallback):
  """relu?(conv(x, w) + b) of NHWC x HWIO float32 through oneDNN; None where XLA's path
  runs instead: where oneDNN cannot run here, or was not chosen over fallback(x, w, b).

  padding: ((top, bottom), (left, right)). The bias add and the ReLU run inside
  oneDNN's convolution (a post-op).
  """
  geometry = (tuple(strides), tuple(tuple(p) for p in padding), bool(relu))
  onednn = lambda *a: _conv(*a, geometry)
  run, batch = _per_device(onednn, (P('batch'), P(), P()), P('batch'), x.shape[0])
  if run is None:
    return None
  (sh, sw), ((pt, pb), (pl, pr)), _ = geometry
  shape = (batch, *x.shape[1:])
  oh, ow = (shape[1] + pt + pb - w.shape[0]) // sh + 1, (shape[2] + pl + pr - w.shape[1]) // sw + 1
  op = (f'conv2d {_dims(shape)} * {_dims(w.shape)}, stride {sh}x{sw}, pads {pt},{pb},{pl},{pr}'
        + (', relu' if relu else ''))
  impls = _impls(_lib.cnnjax_conv_impls, *shape, *w.shape[:2], w.shape[3], oh, ow, sh, sw,
                 pt, pl, pb, pr, int(relu))
  if not _onednn_chosen(op, impls, onednn, fallback, (shape, w.shape, b.shape)):
    return None
  return run(x, w, b)


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

def max_pool(x, window, stride, ph, pw, oh, ow, fallback):
  """Square-window max pool of NHWC float32 through oneDNN; None where XLA's path runs
  instead: where oneDNN cannot run here, or was not chosen over fallback(x).

  ph, pw: (before, after) padding (ignored by the max, as TF's SAME); oh, ow: output size.
  """
  geometry = (window, stride, tuple(ph), tuple(pw), oh, ow)
  onednn = lambda a: _max_pool(a, geometry)
  run, batch = _per_device(onednn, (P('batch'),), P('batch'), x.shape[0])
  if run is None:
    return None
  shape = (batch, *x.shape[1:])
  op = f'max_pool {_dims(shape)}, window {window}, stride {stride}, pads {ph[0]},{ph[1]},{pw[0]},{pw[1]}'
  impls = _impls(_lib.cnnjax_max_pool_impls, *shape, oh, ow, window, stride, ph[0], pw[0],
                 ph[1], pw[1])
  if not _onednn_chosen(op, impls, onednn, fallback, (shape,)):
    return None
  return run(x)


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

def lrn(x, depth_radius, bias, alpha, beta, fallback):
  """tf.nn.lrn of NHWC float32 through oneDNN; None where XLA's path runs instead: where
  oneDNN cannot run here, or was not chosen over fallback(x)."""
  # oneDNN divides alpha by the window size n = 2r + 1; TF does not.
  size = 2 * depth_radius + 1
  params = (size, float(alpha) * size, float(beta), float(bias))
  onednn = lambda a: _lrn(a, params)
  run, batch = _per_device(onednn, (P('batch'),), P('batch'), x.shape[0])
  if run is None:
    return None
  shape = (batch, *x.shape[1:])
  op = (f'lrn {_dims(shape)}, depth radius {depth_radius}, bias {float(bias)!r}, alpha {float(alpha)!r}, '
        f'beta {float(beta)!r}')
  impls = _impls(_lib.cnnjax_lrn_impls, *shape, *params)
  if not _onednn_chosen(op, impls, onednn, fallback, (shape,)):
    return None
  return run(x)


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
