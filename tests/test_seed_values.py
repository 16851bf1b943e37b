"""Every recipe's hyperparameters against the values its seed states.

The expected values are read from the seed documents themselves (../shared/seeds, and
../shared/SPEC.md for the TF tutorial's and cifar10_input's values, which the seeds only
cite), each by a pattern on the seed's own line; the values under test are read from the
real config file, and from the model the config names where the model holds them (LRN
constants, initialisers, dropout rates, batch-norm settings), by running it.
A wrong value in a config or a model fails here.
"""
import ast
import os
import functools
import operator
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from cnnjax import config as config_lib, models, optim
from tests.conftest import ROOT, recipe_config

SHARED = ROOT.parent / 'shared'
# Skipped where ../shared is not beside the checkout; CI (.ci/run sets CNNJAX_REQUIRE_SHARED=1)
# fails instead, so a missing seeds folder never passes for a check.
pytestmark = pytest.mark.skipif(not (SHARED / 'seeds').is_dir()
                                and os.environ.get('CNNJAX_REQUIRE_SHARED') != '1',
                                reason='needs ../shared/seeds')

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def _arith(node):
  """The value of a number or + - * / of numbers, as the seed writes it ('0.001/9.0')."""
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
  raise ValueError(ast.dump(node))


@functools.cache
def document(name):
  """A seed's text by number ('002') or a file of ../shared by name ('SPEC.md')."""
  paths = list((SHARED / 'seeds').glob(f'{name}_*.txt')) or [SHARED / name]
  return paths[0].read_text()


def stated(doc, pattern):
  """The number(s) the first match of `pattern` captures in document `doc`."""
  match = re.search(pattern, document(doc))
  assert match, f'{doc} no longer says {pattern!r}'
  values = [_arith(ast.parse(g.strip(), mode='eval').body) for g in match.groups()]
  return values[0] if len(values) == 1 else tuple(values)


def says(doc, text):
  return text in document(doc)


def approx(x):
  return pytest.approx(x, rel=1e-9)


def model_of(config, num_classes=10):
  return models.create(config.model, num_classes)


def apply_intercepting(config, shape, train):
  """Runs the config's model once; returns [(module, method name)] in call order."""
  model = model_of(config)
  key = jax.random.PRNGKey(0)
  variables = model.init({'params': key, 'dropout': key}, jnp.zeros((2, *shape)))
  calls = []

  def record(next_fun, args, kwargs, context):
    calls.append(context.module)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    model.apply(variables, jnp.ones((2, *shape)), train=train, rngs={'dropout': key},
                mutable=['batch_stats'])
  return calls


# ---------------------------------------------------------------- Recipe A
LRN_NET_LAYERS = (('conv1', 1), ('conv2', 2), ('local3', 3), ('local4', 4), ('logits', 5))


def test_recipe_a_layers_are_seed_000s_and_003s():
  config = recipe_config('cifar_lrn')
  module = model_of(config)
  for layer, n in LRN_NET_LAYERS:
    stddev, wl = stated('000', rf'weight{n} = variable_with_weight_loss\(shape=\[.*?\], '
                               r'stddev=([^,]+), wl=([^)]+)\)')
    if layer == 'logits':  # seed 003 (the 3,000-step claim) keeps the logits out of the L2
      wl = stated('003', r'weight5 = variable_with_weight_loss\(shape=\[192, 10\], '
                         r'stddev=[^,]+, wl=([^)]+)\)')
    bias = stated('000', rf'bias{n} = tf.Variable\(tf.constant\(([^,]+), shape')
    assert module.inits[layer] == (approx(stddev), approx(bias)), layer
    assert config.weight_loss.get(layer, 0.0) == approx(wl), layer
  radius, bias, alpha, beta = stated(
      '000', r'norm1 = tf.nn.lrn\(pool1, (\d+), bias=([^,]+), alpha=([^,]+), beta=([^)]+)\)')
  assert module.lrn == dict(depth_radius=radius, bias=approx(bias), alpha=approx(alpha),
                            beta=approx(beta))
  assert module.norm2_before_pool2 == says('000', 'pool2 = tf.nn.max_pool(norm2')
  assert (config.optimizer, config.learning_rate) == (
      'adam', approx(stated('000', r'tf.train.AdamOptimizer\(([^)]+)\)')))
  assert config.schedule == 'constant'
  assert config.batch_size == stated('003', r'batch_size = (\d+)')
  assert config.num_train_steps == stated('003', r'max_steps = (\d+)')


def check_tutorial_augmentation(augment_cfg):
  """cifar10_input.distorted_inputs / inputs (SPEC.md, Recipe A's 'Train:' and 'Eval:')."""
  crop, brightness, lower, upper = stated(
      'SPEC.md', r'Train: random (\d+)x\d+ crop, random left-right flip, random\s+'
                 r'brightness \((\d+)\), random contrast \(([\d.]+)–([\d.]+)\), '
                 r'per-image standardization')
  assert says('SPEC.md', f'Eval: central\n{crop}x{crop} crop + per-image standardization')
  assert augment_cfg.to_dict() == config_lib.augmentation(
      crop_size=crop, train_crop='random', flip=True, brightness=brightness,
      contrast=(lower, upper), scale='standardize').to_dict()


def test_recipe_a_augmentation_is_distorted_inputs():
  check_tutorial_augmentation(recipe_config('cifar_lrn').augment)


# ---------------------------------------------------------------- Recipe B
def test_recipe_b_is_the_cookbooks():
  config = recipe_config('cifar_cookbook')
  module = model_of(config)
  stddev = stated('002', r'truncated_normal_initializer\(stddev=([\d.]+)\)')
  bias = stated('002', r'def zero_var.*\n.*constant_initializer\(([\d.]+)\)')
  assert module.inits == {layer: (approx(stddev), approx(bias)) for layer, _ in LRN_NET_LAYERS}
  radius, lrn_bias, alpha, beta = stated(
      '002', r'norm1 = tf.nn.lrn\(pool1, depth_radius=(\d+), bias=([^,]+), alpha=([^,]+), '
             r'beta=([^,]+),')
  assert module.lrn == dict(depth_radius=radius, bias=approx(lrn_bias), alpha=approx(alpha),
                            beta=approx(beta))
  assert says('002', 'norm2 = tf.nn.lrn(pool2') and not module.norm2_before_pool2
  assert config.weight_loss.to_dict() == {} and not says('002', 'l2_loss')
  # Augmentation: resize_image_with_crop_or_pad (a central crop, also in training), then
  # flip, brightness, contrast and standardization.
  assert says('002', 'final_image = tf.image.resize_image_with_crop_or_pad(reshaped_image')
  assert says('002', 'tf.image.per_image_standardization(final_image)')
  lower, upper = stated('002', r'random_contrast\(final_image,lower=([\d.]+), upper=([\d.]+)\)')
  assert config.augment.to_dict() == config_lib.augmentation(
      crop_size=stated('002', r'crop_height = (\d+)'), train_crop='central',
      flip=says('002', 'random_flip_left_right(final_image)'),
      brightness=stated('002', r'random_brightness\(final_image,max_delta=(\d+)\)'),
      contrast=(lower, upper), scale='standardize').to_dict()
  # Plain SGD on tf.train.exponential_decay(0.1, generation, 250, 0.9, staircase=True).
  assert says('002', 'tf.train.GradientDescentOptimizer(model_learning_rate)')
  assert says('002', 'num_gens_to_wait, lr_decay, staircase=True)')
  assert (config.optimizer, config.schedule, config.staircase) == ('sgd', 'exponential_decay', True)
  assert config.learning_rate == approx(stated('002', r'learning_rate = ([\d.]+)'))
  assert config.decay_rate == approx(stated('002', r'lr_decay = ([\d.]+)'))
  assert optim.decay_steps(config, 50000) == stated('002', r'num_gens_to_wait = (\d+)')
  assert config.batch_size == stated('002', r'batch_size = (\d+)')
  assert config.num_train_steps == stated('002', r'generations = (\d+)')
  assert config.log_every == stated('002', r'output_every = (\d+)')
  assert config.eval_every == stated('002', r'eval_every = (\d+)')


# ---------------------------------------------------------------- Recipe C
def test_recipe_c_is_the_tf_tutorials():
  config = recipe_config('cifar_tutorial')
  recipe_a = recipe_config('cifar_lrn')
  assert says('SPEC.md', 'Model as Recipe A (logits wl 0;')
  assert config.model == recipe_a.model
  assert {k: v for k, v in config.weight_loss.items() if v} == {
      k: v for k, v in recipe_a.weight_loss.items() if v}
  assert says('SPEC.md', 'Train crop is `random_crop`')
  check_tutorial_augmentation(config.augment)
  lr, rate, epochs = stated('SPEC.md', r'Plain gradient descent \(no momentum\), lr ([\d.]+), '
                                       r'decayed ×([\d.]+) every (\d+) epochs \(staircase;')
  assert (config.optimizer, config.schedule, config.staircase) == ('sgd', 'exponential_decay', True)
  assert (config.learning_rate, config.decay_rate) == (approx(lr), approx(rate))
  # decay_steps as the tutorial computes it: int(NUM_EXAMPLES_PER_EPOCH / batch * epochs).
  assert optim.decay_steps(config, 50000) == int(
      stated('SPEC.md', r'decay_steps = int\(([\d/ *]+)\)'))
  assert config.ema_decay == approx(stated('SPEC.md', r'moving average of the trainable '
                                                      r'weights with decay ([\d.]+)'))
  assert config.num_train_steps == 1000 * stated('SPEC.md', r'~86% after (\d+)k steps')


# ---------------------------------------------------------------- Recipe D
def test_recipe_d_is_seed_003s_mnist_cnn():
  config = recipe_config('mnist_cnn')
  stddev = stated('003', r'initial = tf.truncated_normal\(shape, stddev=([\d.]+)\)')
  bias = stated('003', r'initial = tf.constant\(([\d.]+), shape=shape\)')
  params = model_of(config).init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 28, 28, 1)))
  for layer, p in params['params'].items():
    assert float(jnp.max(jnp.abs(p['kernel']))) <= 2 * stddev, layer  # truncated at 2 sigma
    assert float(jnp.std(p['kernel'])) == pytest.approx(0.8796 * stddev, rel=0.1), layer
    assert jnp.all(p['bias'] == jnp.float32(bias)), layer
  # Dropout with keep_prob 0.5 (rate 0.5) between fc1 and fc2, in training only.
  keep = stated('003', r'keep\\_prob比率为([\d.]+)')
  dropouts = [m for m in apply_intercepting(config, (28, 28, 1), train=True)
              if isinstance(m, nn.Dropout)]
  assert [m.rate for m in dropouts] == [approx(1 - keep)]
  assert config.optimizer == 'adam'
  assert config.learning_rate == approx(stated('003', r'给予一个比较小的学习速率([\d.e-]+)'))
  assert config.batch_size == stated('003', r'使用大小为(\d+)的mini-batch')
  assert config.num_train_steps == stated('003', r'共进行(\d+)次训练迭代')
  assert config.log_every == stated('003', r'其中每(\d+)次训练')
  assert config.augment.to_dict() == config_lib.augmentation(scale='unit').to_dict()  # all off


# ---------------------------------------------------------------- Recipe E
def test_recipe_e_has_seed_000s_cs231n_shape():
  """The seed fixes only the shape: 32x32x3 -> [conv-ReLU, conv-ReLU, pool] x 3 -> fc."""
  config = recipe_config('cifar_deep')
  sizes = [stated('000', rf'Step{n}: 池化一下，变成(\d+)\*') for n in (3, 6, 9)]
  convs = [m for m in apply_intercepting(config, (32, 32, 3), train=True)
           if isinstance(m, models.Conv)]
  assert len(convs) == 6 and all(m.relu and m.kernel_size == (3, 3) for m in convs)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model_of(config).init(jax.random.PRNGKey(0), x))['params']
  assert shapes['fc']['kernel'].shape[0] == sizes[-1] ** 2 * model_of(config).widths[-1]
  assert config.augment.crop_size == 0  # whole 32x32 images, as the seed's Step 1
  assert says('000', '增大训练次数用SGD训练') and config.optimizer in ('sgd', 'momentum')


# ---------------------------------------------------------------- Recipe F
def test_recipe_f_is_seed_004s_paddle_vgg():
  config = recipe_config('cifar_vgg16')
  groups = re.findall(r'conv\d = conv_block\(\w+, (\d+), (\d+), \[([^\]]*)\]', document('004'))
  expected = [(int(w), tuple(float(r) for r in rates.split(','))) for w, n, rates in groups]
  assert [(w, d) for w, d in models.VGG16_CIFAR_GROUPS] == expected
  fc_drop = stated('004', r'paddle.layer.dropout\(input=conv5, dropout_rate=([\d.]+)\)')
  bn_drop = stated('004', r'layer_attr=paddle.attr.Extra\(drop_rate=([\d.]+)\)\)')
  calls = apply_intercepting(config, (32, 32, 3), train=True)
  rates = [m.rate for m in calls if isinstance(m, models.PaddleDropout)]
  assert rates == [r for _, drops in expected for r in drops if r] + [fc_drop, bn_drop]
  # Batch norm: PaddlePaddle's defaults (batch_norm_layer: moving_average_fraction 0.9;
  # BatchNormBaseLayer's EPS 1e-5), its statistics over the batch in training.
  norms = [m for m in calls if isinstance(m, nn.BatchNorm)]
  assert len(norms) == 14
  assert {(m.momentum, m.epsilon, m.use_running_average) for m in norms} == {(0.9, 1e-5, False)}
  # Momentum 0.9, lr 0.1 / 128 and L2 0.0002 * 128 on the summed cost of 128 examples:
  # on the mean cost, lr 0.1 and 0.0002, on every parameter.
  batch = stated('004', r'batch_size=(\d+)\),[\s\d]+num_passes')
  assert config.batch_size == batch
  assert (config.optimizer, config.momentum) == (
      'momentum', approx(stated('004', r'paddle.optimizer.Momentum\([\s\d]+momentum=([\d.]+),')))
  assert config.learning_rate == approx(batch * stated('004', r'learning_rate=([^,]+),[\s\d]+'
                                                              r'learning_rate_decay_a'))
  assert dict(config.weight_loss) == {'*': approx(stated('004', r'L2Regularization\(rate=([^)]+)\)')
                                                  / batch)}
  assert config.weight_loss_on == 'all'
  # 'discexp': lr * a ** floor(samples / b), b = 100 epochs of 50,000 images.
  assert says('004', "learning_rate_schedule='discexp'")
  assert (config.schedule, config.staircase) == ('exponential_decay', True)
  assert config.decay_rate == approx(stated('004', r'learning_rate_decay_a=([\d.]+)'))
  assert config.decay_epochs * 50000 == stated('004', r'learning_rate_decay_b=([^,]+),')
  assert config.num_train_steps == stated('004', r'num_passes=(\d+)') * 50000 // batch
  assert config.augment.to_dict() == config_lib.augmentation(scale='unit').to_dict()  # all off
