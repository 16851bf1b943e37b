"""The recipes' numerics against TensorFlow itself: schedules, initializers, whole
networks (forward and gradients with copied weights), and the random image ops'
distributions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cnnjax import augment, models, optim, state as state_lib, train
from configs import cifar_cookbook, cifar_tutorial
from tests.conftest import recipe_config


# --- schedules ------------------------------------------------------------------------

@pytest.mark.parametrize('get_config,steps', [
    (cifar_cookbook.get_config, [0, 1, 249, 250, 251, 499, 500, 5000, 19999]),
    (cifar_tutorial.get_config, [0, 100000, 136717, 136718, 136719, 300000]),
])
def test_exponential_decay_matches_tf_staircase(tf, get_config, steps):
  config = get_config()
  ours = optim.learning_rate_fn(config, 50000)
  tf_schedule = tf.keras.optimizers.schedules.ExponentialDecay(
      config.learning_rate, optim.decay_steps(config, 50000), config.decay_rate, staircase=True)
  for step in steps:
    np.testing.assert_allclose(float(ours(step)), float(tf_schedule(step)), rtol=1e-6)


def test_tutorial_decay_steps_are_tfs():
  assert optim.decay_steps(cifar_tutorial.get_config(), 50000) == 136718


# --- initializers -----------------------------------------------------------------------

def test_truncated_normal_matches_tf_distribution(tf):
  ours = np.asarray(models.truncated_normal(0.04)(jax.random.PRNGKey(0), (20000,)))
  theirs = tf.random.truncated_normal((20000,), stddev=0.04, seed=1).numpy()
  assert np.abs(ours).max() <= 0.08 and np.abs(theirs).max() <= 0.08
  assert stats.ks_2samp(ours, theirs).pvalue > 0.01
  np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.03)


# --- whole networks ---------------------------------------------------------------------

DENSE = ('local3', 'local4', 'logits')  # tf_lrn_net's layers after the last max pool


def tf_lrn_net(tf, p, x, lrn, norm2_before_pool2, lrn_op):
  """Recipes A/B written with TF ops, as the seeds write them (`lrn_op`: tf.nn.lrn, or
  tf_lrn_formula where tf.nn.lrn has no kernel)."""
  def conv(h, name):
    return tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, p[name]['kernel'], 1, 'SAME'),
                                     p[name]['bias']))

  def pool(h):
    return tf.nn.max_pool2d(h, 3, 2, 'SAME')

  def norm(h):
    return lrn_op(h, **lrn)

  h = norm(pool(conv(x, 'conv1')))
  h = conv(h, 'conv2')
  h = pool(norm(h)) if norm2_before_pool2 else norm(pool(h))
  h = tf.reshape(h, [x.shape[0], -1])
  h = tf.nn.relu(tf.matmul(h, p['local3']['kernel']) + p['local3']['bias'])
  h = tf.nn.relu(tf.matmul(h, p['local4']['kernel']) + p['local4']['bias'])
  return tf.matmul(h, p['logits']['kernel']) + p['logits']['bias']


def tf_lrn_formula(tf, x, depth_radius, bias, alpha, beta):
  """tf.nn.lrn as its documentation defines it, in TF ops: tf.nn.lrn itself takes float32
  (and half) only, so the float64 network below uses this."""
  channels = x.shape[-1]
  squares = tf.pad(tf.square(x), [[0, 0]] * 3 + [[depth_radius, depth_radius]])
  window_sum = tf.add_n([squares[..., i:i + channels] for i in range(2 * depth_radius + 1)])
  return x / (bias + alpha * window_sum) ** beta


def network_beside_tf(tf, recipe, dtype):
  """The recipe's network and loss (its config's weight losses, its model's LRN constants
  and layer order), through train.loss_fn, and the same network written with tf.nn ops
  (in float64 with tf_lrn_formula for tf.nn.lrn), both in `dtype` from the same weights
  and batch: ((loss, logits, grads) ours, TF's)."""
  config = recipe_config(recipe)
  model = models.create(config.model, 10)
  import optax
  state = train.create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (24, 24, 3))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 24, 24, 3)).astype(dtype)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  terms = state_lib.weight_loss_terms(config)
  weight_loss = {name: wl for name, wl in terms if wl}
  assert recipe != 'cifar_lrn' or weight_loss  # the L2 terms are under test there
  params = jax.tree.map(lambda a: np.asarray(a, dtype), state.params)

  with jax.enable_x64(dtype == np.float64):  # the weights were made in float32 above
    (loss, (_, logits, _)), grads = jax.value_and_grad(train.loss_fn, has_aux=True)(
        jax.tree.map(jnp.asarray, params), state, jnp.asarray(images), jnp.asarray(labels),
        terms, config.weight_loss_on, jax.random.PRNGKey(1))
  assert logits.dtype == dtype and all(g.dtype == dtype for g in jax.tree.leaves(grads))

  tf_params = jax.tree.map(tf.Variable, params)
  with tf.GradientTape() as tape:
    lrn_op = (tf.nn.lrn if dtype == np.float32 else
              lambda x, **lrn: tf_lrn_formula(tf, x, **lrn))
    tf_logits = tf_lrn_net(tf, tf_params, tf.constant(images), model.lrn,
                           model.norm2_before_pool2, lrn_op)
    ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf_logits))
    tf_loss = tf.add_n([ce] + [tf.constant(wl, dtype) * tf.nn.l2_loss(tf_params[name]['kernel'])
                               for name, wl in weight_loss.items()])
  tf_grads = jax.tree.map(lambda g: g.numpy(), tape.gradient(tf_loss, tf_params))
  ours = (np.asarray(loss), np.asarray(logits), jax.tree.map(np.asarray, grads))
  return ours, (tf_loss.numpy(), tf_logits.numpy(), tf_grads)


def assert_gradients_close(ours, theirs, atol):
  """Each leaf within `atol` of its largest TF entry."""
  for ours_leaf, tf_leaf in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    scale = np.abs(tf_leaf).max()
    np.testing.assert_allclose(ours_leaf / scale, tf_leaf / scale, rtol=0, atol=atol)


@pytest.mark.parametrize('recipe', ['cifar_lrn', 'cifar_cookbook'])
def test_network_logits_loss_and_dense_gradients_match_tf(tf, cpu_kernels, recipe):
  """float32, on both CPU paths. The convolutions' gradients are left to the float64 test
  below: they pass through max-pool windows whose two largest entries can lie within
  float32 rounding of each other, and there the window's gradient goes to whichever one
  the rounding makes larger, in TF as in ours. Measured on these inputs' kind: jax 0.12.1's
  XLA convolutions and TF 2.21's Python 3.12 build each tip one window of 36,864, moving
  conv2's kernel gradient by 1.8e-4 and 1.2e-2 of its largest entry (docs/RESULTS.md).
  The logits and the loss are continuous in the inputs; the dense layers' gradients meet
  only the dense ReLUs' kinks, whose pre-activations here lie 12x float32's error or more
  from 0 (measured against float64, both recipes)."""
  (loss, logits, grads), (tf_loss, tf_logits, tf_grads) = network_beside_tf(
      tf, recipe, np.float32)
  np.testing.assert_allclose(logits, tf_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(loss, tf_loss, rtol=1e-4)
  assert_gradients_close({k: grads[k] for k in DENSE}, {k: tf_grads[k] for k in DENSE}, 1e-4)


@pytest.mark.parametrize('recipe', ['cifar_lrn', 'cifar_cookbook'])
def test_network_gradients_match_tf_in_float64(tf, recipe):
  """Every gradient, the convolutions' included, through XLA's path (the one float64
  takes: cnnjax/kernels.py's oneDNN kernels are float32): in float64 the two sides agree to
  ~4e-15, so no max-pool window is tipped by rounding. TF's LRN is its documented formula
  in TF ops (tf.nn.lrn has no float64 kernel), checked here against tf.nn.lrn in float32."""
  x = np.random.default_rng(1).normal(size=(4, 6, 6, 64)).astype(np.float32)
  lrn = models.create(recipe_config(recipe).model, 10).lrn
  np.testing.assert_allclose(tf_lrn_formula(tf, tf.constant(x), **lrn).numpy(),
                             tf.nn.lrn(x, **lrn).numpy(), rtol=1e-6, atol=1e-7)
  (loss, logits, grads), (tf_loss, tf_logits, tf_grads) = network_beside_tf(
      tf, recipe, np.float64)
  np.testing.assert_allclose(logits, tf_logits, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(loss, tf_loss, rtol=1e-10)
  assert_gradients_close(grads, tf_grads, 1e-10)


# --- random image ops' distributions -----------------------------------------------------

N = 2000


def tf_draws(tf, op):
  tf.random.set_seed(1234)
  return np.array([op() for _ in range(N)])


def our_draws(fn):
  keys = jax.random.split(jax.random.PRNGKey(1234), N)
  return np.asarray(jax.vmap(fn)(keys))


def test_brightness_delta_is_tfs_uniform(tf):
  zero = tf.zeros((1, 1, 1))
  theirs = tf_draws(tf, lambda: tf.image.random_brightness(zero, 63.0).numpy().item())
  ours = our_draws(lambda k: augment.random_brightness(k, jnp.zeros((1, 1, 1, 1)), 63.0)[0, 0, 0, 0])
  for d in (ours, theirs):
    assert d.min() >= -63 and d.max() <= 63
    assert stats.kstest(d, stats.uniform(-63, 126).cdf).pvalue > 0.01
  assert stats.ks_2samp(ours, theirs).pvalue > 0.01


def test_contrast_factor_is_tfs_uniform(tf):
  # Pixels 0 and 2 (mean 1): the output's second pixel is 1 + factor.
  image = np.array([0.0, 2.0], np.float32).reshape(1, 2, 1)
  theirs = tf_draws(tf, lambda: tf.image.random_contrast(image, 0.2, 1.8).numpy()[0, 1, 0] - 1)
  ours = our_draws(lambda k: augment.random_contrast(k, jnp.asarray(image[None]), 0.2, 1.8)
                   [0, 0, 1, 0] - 1)
  for f in (ours, theirs):
    assert f.min() >= 0.2 - 1e-5 and f.max() <= 1.8 + 1e-5
    assert stats.kstest(f, stats.uniform(0.2, 1.6).cdf).pvalue > 0.01
  assert stats.ks_2samp(ours, theirs).pvalue > 0.01


def test_flip_probability_is_tfs_one_half(tf):
  image = np.array([0.0, 1.0], np.float32).reshape(1, 2, 1)
  theirs = tf_draws(tf, lambda: tf.image.random_flip_left_right(image).numpy()[0, 0, 0])
  ours = our_draws(lambda k: augment.random_flip_left_right(k, jnp.asarray(image[None]))
                   [0, 0, 0, 0])
  for flips in (ours, theirs):
    assert stats.binomtest(int(flips.sum()), N, 0.5).pvalue > 0.01
  table = [[ours.sum(), N - ours.sum()], [theirs.sum(), N - theirs.sum()]]
  assert stats.chi2_contingency(table).pvalue > 0.01


def test_random_crop_offsets_are_tfs_uniform(tf):
  # A 32x32 image whose pixel value is its row: the crop's first row is the offset.
  rows = np.repeat(np.arange(32, dtype=np.float32)[:, None, None], 32, axis=1)
  theirs = tf_draws(tf, lambda: tf.image.random_crop(rows, (24, 24, 1)).numpy()[0, 0, 0])
  ours = our_draws(lambda k: augment.random_crop(k, jnp.asarray(rows[None]), 24)[0, 0, 0, 0])
  bins = np.arange(10) - 0.5
  ours_counts, theirs_counts = np.histogram(ours, bins)[0], np.histogram(theirs, bins)[0]
  for counts in (ours_counts, theirs_counts):
    assert counts.sum() == N  # every offset in 0..8
    assert stats.chisquare(counts).pvalue > 0.01
  assert stats.chi2_contingency([ours_counts, theirs_counts]).pvalue > 0.01
