"""Every recipe: its config, its model, and the state it keeps (EMA, batch norm, dropout)."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import config as config_lib, models, train

RECIPES = {  # config -> (model, parameter count, input shape)
    'cifar_lrn': ('cifar_lrn', 1_068_298, (24, 24, 3)),
    'cifar_cookbook': ('cifar_cookbook', 1_068_298, (24, 24, 3)),
    'cifar_tutorial': ('cifar_lrn', 1_068_298, (24, 24, 3)),
    'mnist_cnn': ('mnist_cnn', 3_274_634, (28, 28, 1)),
    'cifar_deep': ('cifar_deep', 1_186_378, (32, 32, 3)),
    'cifar_vgg16': ('cifar_vgg16', 15_250_378, (32, 32, 3)),
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
                                               coefficients=(), ema_decay=0.9999))
  for i in range(3):
    state, _ = step(state, uint8_batch(8, (32, 32, 3), seed=i))
  # After 3 steps the decay is min(0.9999, 4/13): the average trails the params.
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
  # The train step's dropout stream differs from its augmentation stream.
  key = jax.random.fold_in(state.rng, 0)
  assert not np.array_equal(np.asarray(jax.random.fold_in(key, 1)), np.asarray(key))


def test_vgg_batch_norm_statistics_train_vs_eval():
  config = get_config('cifar_vgg16')
  state = tiny_state('cifar_vgg16', (32, 32, 3))
  before = state.batch_stats
  state2, _ = jax.jit(lambda s, b: train.train_step(
      s, b, augment_cfg=config.augment, coefficients=(('*', 0.0002),)))(
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
  from cnnjax import augment
  return augment.preprocess(None, images, config.augment, train=False)
