"""TensorFlow ports of the recipes' train steps: the peer of cnnjax in benchmarks/.

As a module: TrainStep, the peer in benchmarks/cpu_vs_tf.py. As a script, a TF2
port of the seeds' whole training scripts (seed 003's cifar10 script for Recipe A):

    python benchmarks/tf_reference.py --config configs/cifar_lrn.py [--steps N] [--seed S]
        [--eval_every N] [--checkpoint_dir DIR [--checkpoint_every 1000]] [--isa avx2]

reads the same TFDS data, augments each image on the host with the tf.image ops in a
parallel tf.data pipeline (as cifar10_input.distorted_inputs' 16 threads: distort()), trains
with the seed's log line every log_every steps and evaluates precision @ 1 on exactly
the eval split every eval_every steps (the config's, as cnnjax, so the two sides'
curves meet at the same steps) and at the end. With --checkpoint_dir it saves there and
resumes from there (SIGTERM or SIGINT saves and stops), for schedules longer than a
session. Results: docs/RESULTS.md.

Each recipe's step is written the way the seeds' TF 1.x code computes it (tf.nn
convolutions, max pools and LRN, the tf.image augmentations on 0-255 float
pixels, TF's fused optimizer kernels ResourceApplyAdam / ApplyGradientDescent /
ApplyMomentum, tf.nn.l2_loss weight losses, fused batch norm), as one
`tf.function` in graph mode, so TensorFlow's default oneDNN kernels run it.

Hyperparameters are read from the cnnjax config and the Flax module of the
same recipe (LRN constants, initialisers, widths), so the two sides cannot
drift apart: only the framework differs.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnjax import cpu  # noqa: E402

if __name__ == '__main__':
  cpu.cap_isa_from_argv(sys.argv)  # before TensorFlow loads its oneDNN
  # TensorFlow as its users run it: cnnjax's malloc setting (cnnjax/cpu.py) would slow its
  # 16-thread tf.data pipeline (one arena for every thread: +55 s of a 3,000-step run).
  os.environ['CNNJAX_KEEP_FREED_MEMORY'] = '0'
import tensorflow as tf  # noqa: E402  (after the log level and the ISA cap)

from cnnjax import config as config_lib, models, optim  # noqa: E402


class Params:
  """Named tf.Variables, created in the seeds' order, and their weight losses."""

  def __init__(self, seed):
    self.variables = {}
    self.seed = seed

  def get(self, name, shape, init):
    if name not in self.variables:
      self.seed += 1
      self.variables[name] = tf.Variable(init(shape, self.seed), name=name)
    return self.variables[name]


def truncated(stddev):
  return lambda shape, seed: tf.random.stateless_truncated_normal(shape, (seed, 0), stddev=stddev)


def constant(value):
  return lambda shape, seed: tf.fill(shape, tf.constant(value, tf.float32))


def he_normal(shape, seed):
  fan_in = 1
  for d in shape[:-1]:
    fan_in *= d
  return tf.random.stateless_truncated_normal(shape, (seed, 0), stddev=(2.0 / fan_in) ** 0.5 / .87962566)


def conv(p, name, x, size, features, w_init, b_init=None):
  w = p.get(f'{name}/kernel', [size, size, x.shape[-1], features], w_init)
  y = tf.nn.conv2d(x, w, 1, 'SAME')
  if b_init is not None:
    y = tf.nn.bias_add(y, p.get(f'{name}/bias', [features], b_init))
  return y


def dense(p, name, x, features, w_init, b_init=constant(0.0)):
  w = p.get(f'{name}/kernel', [x.shape[-1], features], w_init)
  return tf.matmul(x, w) + p.get(f'{name}/bias', [features], b_init)


def max_pool(x, window, stride):
  return tf.nn.max_pool2d(x, window, stride, 'SAME')


def lrn_net(module):
  """Recipes A/B/C: the TF tutorial network and the cookbook's variant."""
  lrn = lambda x: tf.nn.lrn(x, **module.lrn)
  init = {k: (truncated(s), constant(b)) for k, (s, b) in module.inits.items()}

  def apply(p, x, train, state):
    del train, state
    x = max_pool(tf.nn.relu(conv(p, 'conv1', x, 5, 64, *init['conv1'])), 3, 2)
    x = lrn(x)
    x = tf.nn.relu(conv(p, 'conv2', x, 5, 64, *init['conv2']))
    x = max_pool(lrn(x), 3, 2) if module.norm2_before_pool2 else lrn(max_pool(x, 3, 2))
    x = tf.reshape(x, [x.shape[0], -1])
    x = tf.nn.relu(dense(p, 'local3', x, 384, *init['local3']))
    x = tf.nn.relu(dense(p, 'local4', x, 192, *init['local4']))
    return dense(p, 'logits', x, module.num_classes, *init['logits'])
  return apply


def mnist_cnn(module):
  """Recipe D: conv - pool - conv - pool - fc - dropout - fc, as the Flax module's fields."""
  w, b = truncated(module.layer_init[0]), constant(module.layer_init[1])

  def apply(p, x, train, state):
    for i, width in enumerate(module.widths, start=1):
      x = max_pool(tf.nn.relu(conv(p, f'conv{i}', x, 5, width, w, b)), 2, 2)
    x = tf.nn.relu(dense(p, 'fc1', tf.reshape(x, [x.shape[0], -1]), module.hidden, w, b))
    if train:
      x = tf.nn.dropout(x, module.dropout, seed=state['dropout_seed'])
    return dense(p, 'fc2', x, module.num_classes, w, b)
  return apply


def deep_cnn(module):
  """Recipe E: [conv3x3-ReLU x2, max pool 2x2] per width, then one fc layer."""
  def apply(p, x, train, state):
    del train, state
    for block, width in enumerate(module.widths, start=1):
      for i in (1, 2):
        x = tf.nn.relu(conv(p, f'conv{block}_{i}', x, 3, width, he_normal, constant(0.0)))
      x = max_pool(x, 2, 2)
    return dense(p, 'fc', tf.reshape(x, [x.shape[0], -1]), module.num_classes, he_normal)
  return apply


def paddle_normal(scale):
  """PaddlePaddle's Gaussian initialiser: N(0, sqrt(scale / fan_in)), not truncated."""
  def init(shape, seed):
    fan_in = 1
    for d in shape[:-1]:
      fan_in *= d
    return tf.random.stateless_normal(shape, (seed, 0), stddev=(scale / fan_in) ** 0.5)
  return init


def vgg16_cifar(module):
  """Recipe F: seed 004's PaddlePaddle VGG-16: its initialisers (He normal convs, N(0,
  1/sqrt(fan_in)) fc weights, zero biases), fused batch norm (momentum 0.9, epsilon
  1e-5), Paddle's dropout (no rescaling in training, x (1 - rate) at test)."""
  def batch_norm(p, name, x, train, state):
    c = x.shape[-1]
    scale = p.get(f'{name}/scale', [c], constant(1.0))
    offset = p.get(f'{name}/bias', [c], constant(0.0))
    mean = p.get(f'{name}/mean', [c], constant(0.0))
    var = p.get(f'{name}/var', [c], constant(1.0))
    shape = x.shape
    x4 = x if len(shape) == 4 else tf.reshape(x, [shape[0], 1, 1, c])
    if train:
      y, m, v = tf.compat.v1.nn.fused_batch_norm(x4, scale, offset, epsilon=1e-5,
                                                  is_training=True)
      # fused_batch_norm returns the unbiased (n / (n - 1)) variance; Paddle keeps the batch's.
      n = tf.cast(tf.size(x4) // c, tf.float32)
      v = v * (n - 1) / n
      state['updates'] += [mean.assign(0.9 * mean + 0.1 * m), var.assign(0.9 * var + 0.1 * v)]
    else:
      y, _, _ = tf.compat.v1.nn.fused_batch_norm(x4, scale, offset, mean, var, epsilon=1e-5,
                                                  is_training=False)
    return tf.reshape(y, shape)

  def dropout(x, rate, train, state):
    if not rate:
      return x
    if not train:
      return x * (1.0 - rate)
    state['dropout_seed'] += 1
    keep = tf.random.stateless_uniform(tf.shape(x), (state['dropout_seed'], 7)) >= rate
    return tf.where(keep, x, tf.zeros_like(x))

  conv_init, fc_init = paddle_normal(2.0), paddle_normal(1.0)

  def apply(p, x, train, state):
    for g, (width, drops) in enumerate(models.VGG16_CIFAR_GROUPS, start=1):
      for i, rate in enumerate(drops, start=1):
        x = conv(p, f'conv{g}_{i}', x, 3, width, conv_init)
        x = tf.nn.relu(batch_norm(p, f'bn{g}_{i}', x, train, state))
        x = dropout(x, rate, train, state)
      x = max_pool(x, 2, 2)
    x = dropout(tf.reshape(x, [x.shape[0], -1]), 0.5, train, state)
    x = tf.nn.relu(batch_norm(p, 'bn_fc1', dense(p, 'fc1', x, 512, fc_init), train, state))
    x = dropout(x, 0.5, train, state)
    x = dense(p, 'fc2', x, 512, fc_init)
    return dense(p, 'logits', x, module.num_classes, fc_init)
  return apply


NETWORKS = {'cifar_lrn': lrn_net, 'cifar_cookbook': lrn_net, 'mnist_cnn': mnist_cnn,
            'cifar_deep': deep_cnn, 'cifar_vgg16': vgg16_cifar}


def augment(x, cfg, train):
  """The tf.image ops of cnnjax.augment, batched, on 0-255 float pixels: the peer of cnnjax's
  in-step augmentation (TrainStep, cpu_vs_tf), and the scripts' evaluation preprocessing.
  The script's training pipeline runs the seed's own per-image ops instead (distort): a port
  of the seed must run its ops, and the step benchmark must augment a batch in the step."""
  x = tf.cast(x, tf.float32)
  n, h, w, _ = x.shape
  size = cfg.crop_size
  if size and train and cfg.train_crop == 'random':
    offsets = tf.random.uniform([n, 2], 0, h - size + 1, tf.int32)
    rows = offsets[:, :1] + tf.range(size)
    cols = offsets[:, 1:] + tf.range(size)
    x = tf.gather(tf.gather(x, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
  elif size:
    x = tf.image.resize_with_crop_or_pad(x, size, size)
  if train and cfg.flip:
    flip = tf.random.uniform([n, 1, 1, 1]) < 0.5
    x = tf.where(flip, tf.reverse(x, [2]), x)
  if train and cfg.brightness:
    x = x + tf.random.uniform([n, 1, 1, 1], -cfg.brightness, cfg.brightness)
  if train and cfg.contrast:
    factor = tf.random.uniform([n, 1, 1, 1], *cfg.contrast)
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    x = (x - mean) * factor + mean
  if cfg.scale == 'standardize':
    return tf.image.per_image_standardization(x)
  return x / 255.0


def learning_rate_fn(config, num_train_examples):
  """tf.compat.v1.train.exponential_decay (or a constant), as the recipe's schedule."""
  if config.schedule == 'constant':
    return lambda step: tf.constant(config.learning_rate)
  return lambda step: tf.compat.v1.train.exponential_decay(
      config.learning_rate, step, optim.decay_steps(config, num_train_examples),
      config.decay_rate, staircase=config.staircase)


def l2_losses(p, coefficients, on='kernels'):
  """sum of wl * tf.nn.l2_loss(v) over the config's layers ('*': the others), v their
  kernels (on='kernels') or every trainable variable (on='all', Paddle's L2 decay)."""
  wl_of = dict(coefficients)
  default = wl_of.pop('*', 0.0)
  terms = []
  for name, var in p.variables.items():
    layer, kind = name.split('/')
    wl = wl_of.get(layer, default)
    if wl and (kind == 'kernel' or (on == 'all' and kind not in ('mean', 'var'))):
      terms.append(wl * tf.nn.l2_loss(var))
  return tf.add_n(terms) if terms else tf.constant(0.0)


class TrainStep:
  """A recipe's whole TF train step on a uint8 batch: augmentation, forward, loss,
  gradients and the optimizer update (plus EMA where the recipe keeps one)."""

  def __init__(self, config, image_shape, num_classes, num_train_examples=50000, seed=0,
               augment_in_step=True):
    tf.random.set_seed(seed)
    self.augment_in_step = augment_in_step
    module = models.create(config.model, num_classes)
    self.config = config
    self.apply = NETWORKS[config.model](module)
    self.lr = learning_rate_fn(config, num_train_examples)
    self.params = Params(seed)
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
    # Build the variables with one (eager) forward pass on the model's input shape.
    size = config.augment.crop_size or image_shape[0]
    self.apply(self.params, tf.zeros([2, size, size, image_shape[2]]), False,
               {'updates': [], 'dropout_seed': seed})
    self.trainable = [v for k, v in self.params.variables.items()
                      if not k.endswith(('/mean', '/var'))]
    self.slots = [[tf.Variable(tf.zeros_like(v)) for v in self.trainable] for _ in range(2)]
    self.ema = ([tf.Variable(v) for v in self.trainable] if config.ema_decay else None)
    self.coefficients = tuple(sorted(config.weight_loss.items()))
    self._fn = tf.function(self._step)
    self.predict = tf.function(lambda images: tf.argmax(self.logits(images), -1,
                                                        output_type=tf.int64))

  def _step(self, images, labels):
    c = self.config
    x = augment(images, c.augment, train=True) if self.augment_in_step else images
    state = {'updates': [], 'dropout_seed': 1}
    with tf.GradientTape() as tape:
      logits = self.apply(self.params, x, True, state)
      ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=labels, logits=logits))
      loss = ce + l2_losses(self.params, self.coefficients, c.weight_loss_on)
    grads = tape.gradient(loss, self.trainable)
    lr = tf.cast(self.lr(self.step), tf.float32)
    for i, (v, g) in enumerate(zip(self.trainable, grads)):
      if c.optimizer == 'adam':
        t = tf.cast(self.step + 1, tf.float32)
        tf.raw_ops.ResourceApplyAdam(
            var=v.handle, m=self.slots[0][i].handle, v=self.slots[1][i].handle,
            beta1_power=0.9 ** t, beta2_power=0.999 ** t, lr=lr, beta1=0.9, beta2=0.999,
            epsilon=1e-8, grad=g)
      elif c.optimizer == 'momentum':
        tf.raw_ops.ResourceApplyMomentum(var=v.handle, accum=self.slots[0][i].handle, lr=lr,
                                         grad=g, momentum=c.momentum)
      else:
        tf.raw_ops.ResourceApplyGradientDescent(var=v.handle, alpha=lr, delta=g)
    self.step.assign_add(1)
    if self.ema is not None:
      step = tf.cast(self.step, tf.float32)
      d = tf.minimum(c.ema_decay, (1.0 + step) / (10.0 + step))
      for e, v in zip(self.ema, self.trainable):
        e.assign(d * e + (1 - d) * v)
    return loss, ce

  def __call__(self, images, labels):
    """(loss with weight losses, mean cross-entropy) of the step just taken."""
    return self._fn(images, labels)

  def logits(self, images):
    """Evaluation-mode logits (weight averages where kept) of preprocessed images."""
    if self.ema is None:
      return self.apply(self.params, images, False, {'updates': [], 'dropout_seed': 0})
    saved = [tf.identity(v) for v in self.trainable]
    for v, e in zip(self.trainable, self.ema):
      v.assign(e)
    try:
      return self.apply(self.params, images, False, {'updates': [], 'dropout_seed': 0})
    finally:
      for v, s in zip(self.trainable, saved):
        v.assign(s)


def distort(image, cfg):
  """cifar10_input.distorted_inputs on one image: the tf.image ops themselves."""
  x = tf.cast(image, tf.float32)
  if cfg.crop_size:
    if cfg.train_crop == 'random':
      x = tf.image.random_crop(x, [cfg.crop_size, cfg.crop_size, x.shape[-1]])
    else:
      x = tf.image.resize_with_crop_or_pad(x, cfg.crop_size, cfg.crop_size)
  if cfg.flip:
    x = tf.image.random_flip_left_right(x)
  if cfg.brightness:
    x = tf.image.random_brightness(x, cfg.brightness)
  if cfg.contrast:
    x = tf.image.random_contrast(x, *cfg.contrast)
  return tf.image.per_image_standardization(x) if cfg.scale == 'standardize' else x / 255.0


def evaluate(step_fn, builder, config):
  """(correct, count) of the evaluation-mode predictions on the whole eval split."""
  import numpy as np
  test = (builder.as_dataset(split=config.eval_split, as_supervised=True).batch(500)
          .map(lambda x, y: (augment(x, config.augment, train=False), y),  # central crop + scaling
               num_parallel_calls=tf.data.AUTOTUNE))
  correct = count = 0
  for images, labels in test:
    correct += int(np.sum(step_fn.predict(images).numpy() == labels.numpy()))
    count += int(labels.shape[0])
  return correct, count


def train_and_evaluate(config, steps, seed, checkpoint_dir=None, checkpoint_every=1000,
                       eval_every=0):
  """The seed's script in TF2: tf.data augmentation, train, log, evaluate.

  Evaluates every `eval_every` steps (0: at the end only) with the line
  `step N: precision @ 1 = P (correct / count)`, and at the end.

  With `checkpoint_dir`, the step, variables, optimizer slots, weight averages and the
  input iterator (its shuffle buffer and position) are saved there every
  `checkpoint_every` steps and on SIGTERM/SIGINT, and a later call resumes from them
  (the augmentation's random draws are not saved: a resumed run is the same recipe, not
  the same bits). Returns the precision, or None when a signal stopped it.
  """
  import signal
  import time

  import tensorflow_datasets as tfds
  tf.random.set_seed(seed)
  builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  info = builder.info
  num_train = info.splits[config.train_split].num_examples
  shape = info.features['image'].shape
  cfg = config.augment
  options = tf.data.Options()
  # The tf.image ops' random state lives outside the pipeline: checkpoint without it.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  train = (builder.as_dataset(split=config.train_split, as_supervised=True)
           .shuffle(20000, seed=seed).repeat()
           .map(lambda x, y: (distort(x, cfg), tf.cast(y, tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE)
           .batch(config.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
           .with_options(options))
  batches = iter(train)
  step_fn = TrainStep(config, shape, info.features['label'].num_classes, num_train, seed,
                      augment_in_step=False)
  manager = None
  if checkpoint_dir:
    saved = tf.train.Checkpoint(step=step_fn.step, variables=list(step_fn.params.variables.values()),
                                slots=step_fn.slots, ema=step_fn.ema or [], data=batches)
    manager = tf.train.CheckpointManager(saved, checkpoint_dir, max_to_keep=2)
    if manager.latest_checkpoint:
      saved.restore(manager.latest_checkpoint).assert_consumed()
      print(f'resumed from {manager.latest_checkpoint} at step {int(step_fn.step)}', flush=True)
  received = []
  handlers = {sig: signal.signal(sig, lambda signum, _: received.append(signal.Signals(signum).name))
              for sig in (signal.SIGTERM, signal.SIGINT)}
  first = last_step = int(step_fn.step)
  start = time.perf_counter()
  last = start
  for step in range(first, steps):
    images, labels = next(batches)
    loss, ce = step_fn(images, labels)
    if step % config.log_every == 0:
      loss_value = float(loss)
      now = time.perf_counter()
      duration = (now - last) / (step + 1 - last_step)  # the steps since the previous line
      last, last_step = now, step + 1
      print(f'step {step}, loss = {loss_value:.2f} ({config.batch_size / duration:.1f} '
            f'examples/sec; {duration:.3f} sec/batch); cross-entropy {float(ce):.4f}', flush=True)
    done = step + 1
    if eval_every and done % eval_every == 0 and done < steps:
      correct, count = evaluate(step_fn, builder, config)
      print(f'step {done}: precision @ 1 = {correct / count:.4f} ({correct} / {count})',
            flush=True)
    if manager and (done % checkpoint_every == 0 or received):
      manager.save(checkpoint_number=done)
    if received:
      print(f'stopped by {received[0]} after step {done}'
            + ('; checkpoint written' if manager else ''), flush=True)
      return None
  for sig, handler in handlers.items():
    signal.signal(sig, handler)
  train_time = time.perf_counter() - start

  correct, count = evaluate(step_fn, builder, config)
  total = time.perf_counter() - start
  print(f'precision @ 1 = {correct / count:.4f} ({correct} / {count}); training {train_time:.1f} s, '
        f'training + evaluation {total:.1f} s', flush=True)
  return correct / count


def main():
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--steps', type=int, default=0, help='default: the config\'s num_train_steps')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--checkpoint_dir', help='save there, and resume from there')
  parser.add_argument('--checkpoint_every', type=int, default=1000)
  parser.add_argument('--eval_every', type=int, default=None,
                      help="default: the config's eval_every; 0: at the end only")
  parser.add_argument('--isa', choices=list(cpu.ISA_CAPS), default='native',
                      help="cap TensorFlow's oneDNN at this ISA (cnnjax/cpu.py)")
  args = parser.parse_args()
  if args.checkpoint_every < 1 or (args.eval_every or 0) < 0:
    parser.error('--checkpoint_every must be at least 1 and --eval_every at least 0')
  config = config_lib.load_file(args.config)
  print(f'tensorflow {tf.__version__}: {config.recipe}; {cpu.describe()}', flush=True)
  train_and_evaluate(config, args.steps or config.num_train_steps, args.seed,
                     args.checkpoint_dir, args.checkpoint_every,
                     config.eval_every if args.eval_every is None else args.eval_every)


if __name__ == '__main__':
  main()
