"""Every recipe: its config, its model, and the state it keeps (EMA, batch norm, dropout)."""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import augment, config as config_lib, loop, models, state as state_lib, train
from tests.conftest import recipe_config

RECIPES = {  # config -> (model, parameter count, input shape)
    'cifar_lrn': ('cifar_lrn', 1_068_298, (24, 24, 3)),
    'cifar_cookbook': ('cifar_cookbook', 1_068_298, (24, 24, 3)),
    'cifar_tutorial': ('cifar_lrn', 1_068_298, (24, 24, 3)),
    'mnist_cnn': ('mnist_cnn', 3_274_634, (28, 28, 1)),
    'cifar_deep': ('cifar_deep', 1_186_378, (32, 32, 3)),
    'cifar_vgg16': ('cifar_vgg16', 15_250_378, (32, 32, 3)),
    'cifar_fast': ('cifar_fast', 1_971_640, (32, 32, 3)),
    'imagenet_vgg16': ('vgg16_imagenet', 138_357_544, (224, 224, 3)),
}


def get_config(name):
  return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_config_validates_and_names_a_registered_model(name):
  config = get_config(name)
  config_lib.validate(config)
  model_name, count, shape = RECIPES[name]
  assert config.model == model_name
  size = config.augment.crop_size
  assert (size or shape[0]) == shape[0]
  model = models.create(model_name, 1000 if name == 'imagenet_vgg16' else 10)
  variables = jax.eval_shape(lambda: model.init(
      {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
      jnp.zeros((1, *shape))))
  assert models.param_count(variables['params']) == count


def test_ema_matches_tf_exponential_moving_average(tf):
  var = tf.Variable([1.0, -2.0])
  step = tf.Variable(0, dtype=tf.int64)
  tf_ema = tf.train.ExponentialMovingAverage(0.9999, num_updates=step)
  tf_ema.apply([var])  # creates the shadow at the initial value
  ours = {'w': jnp.array([1.0, -2.0])}
  for s in range(1, 30):
    var.assign(var + [0.5 * s, -0.25])
    step.assign(s)  # TF's tutorial applies the average after apply_gradients bumps the step
    tf_ema.apply([var])
    ours = train.ema_update(ours, {'w': jnp.asarray(var.numpy())}, s, 0.9999)
  np.testing.assert_allclose(ours['w'], tf_ema.average(var).numpy(), rtol=1e-6)


def tiny_state(model_name, shape, ema=False):
  model = models.create(model_name, 10)
  return train.create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.01), shape, ema=ema)


def uint8_batch(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.integers(0, 256, (n, *shape), dtype=np.uint8)),
          'label': jnp.asarray(rng.integers(0, 10, n).astype(np.int32))}


def test_tutorial_recipe_keeps_and_evaluates_with_the_average():
  config = get_config('cifar_tutorial')
  state = tiny_state('cifar_lrn', (24, 24, 3), ema=True)
  step = jax.jit(lambda s, b: train.train_step(s, b, augment_cfg=config.augment,
                                               weight_loss_terms=(),
                                               ema_decay=config.ema_decay))
  for i in range(3):
    state, _ = step(state, uint8_batch(8, (32, 32, 3), seed=i))
  # After 3 steps the decay is min(ema_decay, 4/13): the average trails the params.
  assert not np.allclose(state.ema_params['local3']['kernel'], state.params['local3']['kernel'])
  batch = dict(uint8_batch(8, (32, 32, 3)), mask=jnp.ones(8, bool))
  with_ema = train.eval_step(state, batch, augment_cfg=config.augment)
  without = train.eval_step(state.replace(ema_params=None), batch, augment_cfg=config.augment)
  assert with_ema['loss_sum'] != without['loss_sum']


def test_mnist_dropout_only_in_training_with_its_own_stream():
  state = tiny_state('mnist_cnn', (28, 28, 1))
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 28, 28, 1))
  apply = lambda train_mode, key: state.apply_fn({'params': state.params}, x, train=train_mode,
                                                 rngs={'dropout': key})
  np.testing.assert_array_equal(apply(False, jax.random.PRNGKey(0)),
                                apply(False, jax.random.PRNGKey(1)))
  a, b = apply(True, jax.random.PRNGKey(0)), apply(True, jax.random.PRNGKey(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, apply(True, jax.random.PRNGKey(0)))
  # The train step draws its dropout from fold_in(step key, 1), not from the step key
  # that drives the augmentation: its loss is the loss under exactly that key.
  config = get_config('mnist_cnn')
  batch = uint8_batch(8, (28, 28, 1))
  _, metrics = train.train_step(state, batch, augment_cfg=config.augment, weight_loss_terms=())
  key = jax.random.fold_in(state.rng, state.step)
  images = augment.preprocess(key, batch['image'], config.augment, train=True)
  loss = lambda dropout_key: train.loss_fn(state.params, state, images, batch['label'], (),
                                           'kernels', dropout_key)[0]
  assert metrics['loss'] == loss(jax.random.fold_in(key, 1))
  assert metrics['loss'] != loss(key)


def test_vgg_batch_norm_statistics_train_vs_eval():
  config = get_config('cifar_vgg16')
  state = tiny_state('cifar_vgg16', (32, 32, 3))
  before = state.batch_stats
  state2, _ = jax.jit(lambda s, b: train.train_step(
      s, b, augment_cfg=config.augment,
      weight_loss_terms=state_lib.weight_loss_terms(config)))(
          state, uint8_batch(8, (32, 32, 3)))
  # Training updates the running statistics kept in the train state.
  assert not np.allclose(state2.batch_stats['bn1_1']['mean'], before['bn1_1']['mean'])
  # Evaluation uses them: an example's logits do not depend on the rest of its batch.
  x = augment_eval(config, uint8_batch(8, (32, 32, 3), seed=5)['image'])
  variables = {'params': state2.params, 'batch_stats': state2.batch_stats}
  full = state2.apply_fn(variables, x, train=False)
  alone = state2.apply_fn(variables, x[:1], train=False)
  np.testing.assert_allclose(full[:1], alone, rtol=1e-4, atol=1e-5)


def augment_eval(config, images):
  return augment.preprocess(None, images, config.augment, train=False)


def test_vgg_initialisers_are_paddles():
  """img_conv_layer: N(0, sqrt(2 / (k * k * C_in))); other weights ('initial_smart'):
  N(0, 1 / sqrt(fan_in)); both plain Gaussians, not truncated. Biases 0, BN scale 1."""
  config = get_config('cifar_vgg16')
  params = models.create(config.model, 10).init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 32, 32, 3)))['params']
  for name, layer in params.items():
    if 'kernel' not in layer:  # batch norm
      np.testing.assert_array_equal(layer['scale'], 1.0)
      np.testing.assert_array_equal(layer['bias'], 0.0)
      continue
    w = np.asarray(layer['kernel'], np.float64)
    if w.ndim == 4:
      k, _, c_in, _ = w.shape
      std = (2.0 / (k ** 2 * c_in)) ** 0.5
    else:
      std = 1 / w.shape[0] ** 0.5
      np.testing.assert_array_equal(layer['bias'], 0.0)
    assert abs(w.mean()) < 4 * std / w.size ** 0.5, name
    assert w.std() == pytest.approx(std, rel=4 / (2 * w.size) ** 0.5 + 1e-3), name
    # Untruncated: 4.55% of a Gaussian lies beyond 2 sigma (none would, truncated).
    beyond = np.mean(np.abs(w) > 2 * std)
    assert abs(beyond - 0.0455) < 4 * (0.0455 / w.size) ** 0.5, name


@pytest.mark.parametrize('rate', [0.3, 0.4, 0.5])
def test_paddle_dropout_masks_unscaled_in_training_and_scales_at_test(rate):
  x = 1 + jax.random.uniform(jax.random.PRNGKey(0), (200, 500))
  dropout = models.PaddleDropout(rate)
  y = np.asarray(dropout.apply({}, x, True, rngs={'dropout': jax.random.PRNGKey(1)}))
  kept = y != 0
  np.testing.assert_array_equal(y[kept], np.asarray(x)[kept])  # no 1 / (1 - rate)
  assert abs(kept.mean() - (1 - rate)) < 4 * (rate * (1 - rate) / x.size) ** 0.5
  np.testing.assert_array_equal(dropout.apply({}, x, False), x * np.float32(1 - rate))


def test_vgg_train_step_draws_its_dropout_masks_without_jaxs_rolled_threefry_loop():
  """On the CPU jax.random lowers threefry as a while loop over the whole mask, which XLA
  fuses with nothing; ops.bernoulli writes the hash out. Loops over keys (u32[1], u32[4]:
  splits and fold-ins) are left; none may carry a mask (an array of rank 2 or more)."""
  from cnnjax import bench
  hlo = bench.Synthetic(recipe_config('cifar_vgg16', batch_size=4,
                                      steps_per_dispatch=1)).compiled_text()
  loops = [line for line in hlo.splitlines() if ' while(' in line]
  assert loops  # the key splits'
  assert not [line for line in loops if re.search(r'u32\[\d+,', line)], loops


def test_vgg_trains_as_with_jax_random_bernoulli_to_rounding(monkeypatch):
  """ops.bernoulli draws jax.random.bernoulli's masks, so two train steps of Recipe F end in
  the same state either way, to float rounding: the fused draws change how XLA fuses the
  float ops around them (~3e-6 here), where one other mask moves every layer by order 1."""
  from cnnjax import bench, kernels, ops
  states = []
  with kernels.using('xla'):  # one path for both
    for draw in (ops.bernoulli, jax.random.bernoulli):
      monkeypatch.setattr(ops, 'bernoulli', draw)
      steps = bench.Synthetic(recipe_config('cifar_vgg16', batch_size=4, steps_per_dispatch=2))
      steps.train_once()
      states.append((steps.state.params, steps.state.batch_stats))
  written, jax_own = (jax.tree_util.tree_flatten_with_path(s)[0] for s in states)
  for (path, a), (_, b) in zip(written, jax_own, strict=True):
    if jax.tree_util.keystr(path).endswith("['fc1']['bias']"):
      continue  # feeds batch norm: its true gradient is 0, its update pure rounding
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), jax.tree_util.keystr(path)


def test_vgg_weight_loss_decays_every_parameter_as_paddles_l2():
  """Paddle's L2Regularization adds rate * p to every parameter's gradient: biases and
  batch-norm scale and offset too, not only kernels."""
  config = get_config('cifar_vgg16')
  params = tiny_state('cifar_vgg16', (32, 32, 3)).params
  terms = state_lib.weight_loss_terms(config)
  grads = jax.grad(train.weight_loss)(params, terms, config.weight_loss_on)
  wl = config.weight_loss['*']
  jax.tree.map(lambda g, p: np.testing.assert_allclose(g, wl * p, rtol=1e-6), grads, params)
  assert np.all(np.asarray(grads['bn1_1']['scale']) == np.float32(wl))  # scale starts at 1
  kernels_only = jax.grad(train.weight_loss)(params, terms, 'kernels')
  assert np.all(np.asarray(kernels_only['bn1_1']['scale']) == 0)



TRAINED_RECIPES = ('cifar_lrn', 'cifar_cookbook', 'cifar_tutorial', 'mnist_cnn', 'cifar_deep',
                   'cifar_vgg16')


@pytest.mark.parametrize('name', TRAINED_RECIPES)
def test_each_recipe_config_trains_real_steps_and_evaluates(name):
  """configs/<name>.py through the trainer's own jitted train step on real data: its
  augmentation, weight losses, optimizer, schedule, EMA and batch-norm state."""
  config = recipe_config(name, train_split='train[:64]', eval_split='test[:20]', batch_size=16,
                         eval_batch_size=16)
  trainer = loop.Trainer(config)
  before = jax.tree.map(np.array, trainer.state)
  state = trainer.state
  state, metrics = trainer.train(state, 0, 3)
  assert np.all(np.isfinite(metrics['loss'])) and np.all(metrics['loss'] >= metrics['cross_entropy'])
  assert int(state.step) == 3
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before.params, state.params)
  assert all(jax.tree.leaves(changed)), changed
  assert (state.ema_params is not None) == (config.ema_decay > 0)
  if state.ema_params is not None:  # the average moved, and trails the parameters
    assert not np.array_equal(state.ema_params['local3']['kernel'], before.params['local3']['kernel'])
    assert not np.array_equal(state.ema_params['local3']['kernel'], state.params['local3']['kernel'])
  if state.batch_stats is not None:
    assert not np.array_equal(state.batch_stats['bn1_1']['mean'], before.batch_stats['bn1_1']['mean'])
  result = trainer.evaluate(state)
  assert result['count'] == 20 and 0 <= result['correct'] <= 20


def test_vgg_recipe_learns_one_batch_at_paddles_per_example_rates():
  """Recipe F's loss falls. Paddle's rates are per example (lr 0.1 / 128 and L2 0.0002 *
  128 on the summed cost), so at batch 32 they are lr * 32 / 128 and wl * 128 / 32 on
  the mean cost; 32 images seen 30 times."""
  config = get_config('cifar_vgg16')
  scale = 32 / config.batch_size
  trainer = loop.Trainer(recipe_config(
      'cifar_vgg16', train_split='train[:32]', eval_split='test[:16]', batch_size=32,
      learning_rate=config.learning_rate * scale,
      weight_loss={'*': config.weight_loss['*'] / scale}))
  _, metrics = trainer.train(trainer.state, 0, 30)
  losses = np.asarray(metrics['cross_entropy'])
  assert losses[0] == pytest.approx(np.log(10), abs=0.3)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
