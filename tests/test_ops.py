"""cnnjax.ops against TensorFlow's own ops, forward and gradient; ops.bernoulli against
jax.random.bernoulli."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import kernels, ops
from tests.conftest import EIGHT, run_code, unset_env

LRN_RECIPES = {
    'recipe_a': dict(depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75),
    'recipe_b': dict(depth_radius=5, bias=2.0, alpha=1e-3, beta=0.75),
    'tf_defaults': dict(depth_radius=5, bias=1.0, alpha=1.0, beta=0.5),
}


@pytest.mark.parametrize('name', sorted(LRN_RECIPES))
def test_lrn_matches_tf(tf, cpu_kernels, name):
  params = LRN_RECIPES[name]
  x = np.random.default_rng(0).normal(0, 3, (4, 6, 6, 64)).astype(np.float32)
  g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    expected = tf.nn.lrn(xt, **params)
  expected_grad = tape.gradient(expected, xt, output_gradients=tf.constant(g))
  out, vjp = jax.vjp(lambda v: ops.lrn(v, **params), jnp.asarray(x))
  np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], expected_grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('window,stride,shape', [
    (3, 2, (2, 24, 24, 8)),  # Recipe A/B pools: 24 -> 12
    (3, 2, (2, 12, 12, 8)),  # 12 -> 6
    (3, 2, (2, 7, 9, 3)),  # odd sizes: TF pads the extra pixel after
    (2, 2, (2, 28, 28, 4)),  # Recipe D pools
    (2, 2, (2, 7, 7, 4)),  # 7 -> 4 with SAME padding
])
def test_max_pool_matches_tf_forward_and_gradient(tf, cpu_kernels, window, stride, shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  _check_pool_against_tf(tf, x, window, stride)


def test_max_pool_ties_route_gradient_like_tf(tf, cpu_kernels):
  # Small integers give many equal maxima; TF sends the gradient to the first.
  x = np.random.default_rng(0).integers(0, 3, (2, 12, 12, 4)).astype(np.float32)
  _check_pool_against_tf(tf, x, 3, 2)


def _check_pool_against_tf(tf, x, window, stride):
  out_shape = None
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    expected = tf.nn.max_pool2d(xt, window, stride, 'SAME')
  out_shape = expected.shape
  g = np.random.default_rng(2).normal(size=out_shape).astype(np.float32)
  expected_grad = tape.gradient(expected, xt, output_gradients=tf.constant(g))
  out, vjp = jax.vjp(lambda v: ops.max_pool(v, window, stride, 'SAME'), jnp.asarray(x))
  np.testing.assert_array_equal(out, expected.numpy())
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], expected_grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shape,kernel,stride,padding,relu', [
    ((4, 24, 24, 3), (5, 5, 3, 64), 1, 'SAME', True),  # Recipe A conv1
    ((4, 12, 12, 64), (5, 5, 64, 64), 1, 'SAME', True),  # Recipe A conv2
    ((3, 9, 7, 5), (3, 3, 5, 6), 2, 'SAME', False),  # odd sizes, stride 2: TF pads after
    ((2, 8, 8, 4), (3, 3, 4, 8), 1, 'VALID', False),
    ((4, 2, 2, 16), (3, 3, 16, 8), 1, 'SAME', True),  # Recipe F's 2x2 maps: window > input
    ((2, 4, 5, 3), (5, 5, 3, 4), 2, 'SAME', False),  # the same, strided: dilated gradient
])
def test_conv_bias_relu_matches_tf_forward_and_gradients(tf, cpu_kernels, shape, kernel, stride,
                                                         padding, relu):
  # Inputs on a dyadic grid (x in eighths, w and b in 64ths, |w| <= 1/8): every product is
  # a multiple of 2**-9 and every sum stays below 2**15, so the convolution is exact in
  # float32 in any summation order. ReLU's kink is then decided alike on both sides,
  # exact zeros included (gradient 0 there, as tf.nn.relu's); with normal draws one
  # pre-activation of Recipe A's conv2 shape lay 3.3e-5 from 0, float32 error 2.6e-5.
  rng = np.random.default_rng(0)
  x = (rng.integers(-8, 9, shape) / 8).astype(np.float32)
  w = (rng.integers(-8, 9, kernel) / 64).astype(np.float32)
  b = (rng.integers(-8, 9, kernel[-1:]) / 64).astype(np.float32)
  inputs = [tf.constant(v) for v in (x, w, b)]
  with tf.GradientTape() as tape:
    tape.watch(inputs)
    expected = tf.nn.bias_add(tf.nn.conv2d(inputs[0], inputs[1], stride, padding), inputs[2])
    expected = tf.nn.relu(expected) if relu else expected
  g = rng.normal(size=expected.shape).astype(np.float32)
  expected_grads = tape.gradient(expected, inputs, output_gradients=tf.constant(g))
  conv = lambda *a: ops.conv2d(*a, stride=stride, padding=padding, relu=relu)
  out, vjp = jax.vjp(conv, *map(jnp.asarray, (x, w, b)))
  np.testing.assert_array_equal(out, expected.numpy())  # exact, as above
  assert not relu or (expected.numpy() == 0).mean() > 0.4  # the kink is under test
  for ours, theirs in zip(vjp(jnp.asarray(g)), expected_grads, strict=True):
    scale = np.abs(theirs.numpy()).max()
    np.testing.assert_allclose(ours / scale, theirs.numpy() / scale, atol=2e-6)


def test_cpu_kernels_are_onednn_where_built():
  # The install builds the extension on Linux x86_64 (setup.py); a broken build must not
  # pass CI unnoticed by silently falling back to XLA's path.
  import platform
  from cnnjax import kernels
  if platform.system() != 'Linux' or platform.machine() != 'x86_64':
    pytest.skip('the oneDNN extension is built on Linux x86_64 only')
  assert kernels.available(), kernels.describe()
  with kernels.using('auto'):
    assert kernels.enabled() and kernels.describe().startswith('oneDNN')
  with kernels.using('xla'):
    assert not kernels.enabled() and 'CNNJAX_CPU_KERNELS=xla' in kernels.describe()


def test_other_backends_keep_xlas_kernels(monkeypatch):
  from cnnjax import kernels
  monkeypatch.setattr(kernels.jax, 'default_backend', lambda: 'gpu')
  with kernels.using('auto'):
    assert not kernels.enabled()
    assert kernels.describe() == 'XLA (gpu backend)'


def test_l2_loss_matches_tf(tf):
  w = np.random.default_rng(0).normal(size=(5, 5, 3, 64)).astype(np.float32)
  np.testing.assert_allclose(ops.l2_loss(jnp.asarray(w)), tf.nn.l2_loss(w).numpy(), rtol=1e-6)


IMPORT_AND_PRINT_XLA_FLAGS = 'import os, cnnjax.kernels; print(os.environ.get("XLA_FLAGS"))'


def xla_flags_after_import(**env):
  result = run_code(IMPORT_AND_PRINT_XLA_FLAGS, env={'XLA_FLAGS': None, 'JAX_PLATFORMS': None,
                                                     **env})
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip()


def test_xla_convolutions_are_kept_off_ynnpack_unless_the_user_chose():
  assert xla_flags_after_import() == kernels.YNN_FLAG
  mine = '--xla_cpu_experimental_ynn_fusion_type='
  assert xla_flags_after_import(XLA_FLAGS=mine) == mine


def test_no_xla_cpu_flag_where_a_gpu_plugin_is_installed_or_another_platform_asked(tmp_path):
  # A GPU user's environment: jax finds its CUDA plugin through the jax_plugins entry point.
  plugin = tmp_path / 'jax_cuda13_plugin-0.12.0.dist-info'
  plugin.mkdir()
  (plugin / 'METADATA').write_text('Metadata-Version: 2.1\nName: jax-cuda13-plugin\n'
                                   'Version: 0.12.0\n')
  (plugin / 'entry_points.txt').write_text('[jax_plugins]\nxla_cuda13 = jax_cuda13_plugin\n')
  path = f'{tmp_path}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'
  assert xla_flags_after_import(PYTHONPATH=path) == 'None'  # left as the user gave it
  assert xla_flags_after_import(PYTHONPATH=path, JAX_PLATFORMS='cpu') == kernels.YNN_FLAG
  assert xla_flags_after_import(JAX_PLATFORMS='cuda') == 'None'
  assert xla_flags_after_import(JAX_PLATFORMS='cuda', XLA_FLAGS='--xla_dump_to=x') == \
      '--xla_dump_to=x'


def test_the_xla_cpu_flag_only_where_the_installed_jaxlib_knows_it(monkeypatch):
  unset_env(monkeypatch, 'XLA_FLAGS', 'JAX_PLATFORMS')  # the code under test sets XLA_FLAGS
  assert kernels.jaxlib_knows((b'xla_force_host_platform_device_count',))  # the tests use it
  assert not kernels.jaxlib_knows((b'xla_cpu_no_such_flag_in_any_jaxlib',))
  if kernels.jaxlib_knows(kernels.YNN_FLAG_NEEDS):
    assert kernels._keep_xla_convolutions_off_ynnpack()
    assert os.environ['XLA_FLAGS'] == kernels.YNN_FLAG
    monkeypatch.delenv('XLA_FLAGS')
  # A jaxlib that dropped or renamed the flag (or its value): XLA would abort on it.
  monkeypatch.setattr(kernels, 'YNN_FLAG_NEEDS', (b'xla_cpu_no_such_flag_in_any_jaxlib',))
  assert not kernels._keep_xla_convolutions_off_ynnpack()
  assert 'XLA_FLAGS' not in os.environ


BERNOULLI_SHAPES = [(), (0, 3), (7,), (3, 5), (2, 3, 5, 7), (4, 6, 6, 8)]


@pytest.mark.parametrize('shape', BERNOULLI_SHAPES)
@pytest.mark.parametrize('p', [0.5, 0.6, 0.7])
def test_bernoulli_draws_jax_random_bernoullis_bits(shape, p):
  draw = jax.jit(ops.bernoulli, static_argnums=(1, 2))
  for key in (jax.random.PRNGKey(3), jax.random.key(11), jax.random.fold_in(jax.random.key(5), 9)):
    expected = np.asarray(jax.random.bernoulli(key, p, shape))
    np.testing.assert_array_equal(draw(key, p, shape), expected)
    np.testing.assert_array_equal(ops.bernoulli(key, p, shape), expected)  # eagerly too


def test_bernoulli_with_another_prng_is_jax_random_bernoulli():
  key = jax.random.key(0, impl='rbg')
  np.testing.assert_array_equal(ops.bernoulli(key, 0.6, (5, 7)),
                                jax.random.bernoulli(key, 0.6, (5, 7)))


def test_bernoulli_on_the_cpu_fuses_with_its_use_without_jaxs_rolled_loop():
  """jax.random's CPU lowering of threefry is a while loop over whole arrays; ops.bernoulli's
  hash is written out, so the masked select compiles to loop-free fusions."""
  x = jnp.ones((4, 8, 8, 16))
  hlo = lambda draw: jax.jit(lambda k, x: jnp.where(draw(k, 0.6, x.shape), x, 0.0)).lower(
      jax.random.PRNGKey(0), x).compile().as_text()
  assert ' while(' in hlo(jax.random.bernoulli)
  assert ' while(' not in hlo(ops.bernoulli)


def test_bernoulli_sharded_over_eight_devices_draws_the_same_bits():
  code = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from cnnjax import ops
assert jax.device_count() == 8
key, shape = jax.random.PRNGKey(7), (16, 6, 6, 8)
batch = NamedSharding(jax.make_mesh((8,), ('batch',)), P('batch'))
draw = jax.jit(lambda k: ops.bernoulli(k, 0.6, shape), out_shardings=batch)
np.testing.assert_array_equal(draw(key), jax.random.bernoulli(key, 0.6, shape))
"""
  result = run_code(code, env=EIGHT, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
