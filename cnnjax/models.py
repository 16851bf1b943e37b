"""The recipes' networks as Flax modules, found by name through one registry.

Modules are pure: `model.apply(variables, images, train=...)`. Layer names are
the seeds' (conv1, local3, ...), so a config's `weight_loss` names them, and
kernels use TF's layouts (HWIO, in x out) so weights copy across unchanged.
"""
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import ops

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name):
  def add(factory):
    _MODELS[name] = factory
    return factory
  return add


def names():
  return sorted(_MODELS)


def create(name, num_classes, **options):
  """The registered model `name`, built with `options` (config.model_options: the fields
  of its module); KeyError lists the known names."""
  if name not in _MODELS:
    raise KeyError(f'unknown model {name!r}; known models: {", ".join(names())}')
  return _MODELS[name](num_classes=num_classes, **options)


def truncated_normal(stddev):
  """tf.truncated_normal(stddev=s): N(0, s) cut at +-2s and redrawn (not rescaled)."""
  return nn.initializers.truncated_normal(stddev)


class Conv(nn.Module):
  """A 2-D convolution with nn.Conv's parameters (HWIO `kernel`, `bias`) and an optional
  fused ReLU, computed by ops.conv2d: one oneDNN call on the CPU, XLA elsewhere."""
  features: int
  kernel_size: tuple
  padding: str = 'SAME'
  use_bias: bool = True
  relu: bool = False
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', self.bias_init, (self.features,)) if self.use_bias else None
    return ops.conv2d(x, kernel, bias, padding=self.padding, relu=self.relu)


# PyTorch's default for nn.Conv2d and nn.Linear weights (kaiming_uniform with a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def dirac(base=TORCH_DEFAULT_INIT):
  """torch.nn.init.dirac_ on the first C_in filters of an HWIO kernel, `base` on the rest:
  the convolution starts by passing its input channels through unchanged (airbench)."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, cin, cout = shape
    kernel = base(key, shape, dtype)
    identity = jnp.zeros((kh, kw, cin, cin), dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, dtype=dtype))
    return kernel.at[..., :min(cin, cout)].set(identity[..., :min(cin, cout)])
  return init


def conv(features, stddev, bias, name, size=5, relu=True):
  return Conv(features, (size, size), padding='SAME', name=name, relu=relu,
              kernel_init=truncated_normal(stddev), bias_init=nn.initializers.constant(bias))


def dense(features, stddev, bias, name):
  return nn.Dense(features, name=name,
                  kernel_init=truncated_normal(stddev), bias_init=nn.initializers.constant(bias))


class LrnNet(nn.Module):
  """The TF CIFAR-10 tutorial network (Recipe A/C) and the cookbook's variant (B).

  conv-ReLU-pool-LRN, conv-ReLU-[LRN, pool] (order per `norm2_before_pool2`),
  then local3 (384) - local4 (192) - logits. Max pools are 3x3 stride 2 SAME.
  """
  num_classes: int
  lrn: dict  # depth_radius, bias, alpha, beta
  inits: dict  # per layer: (truncated-normal stddev, bias constant)
  norm2_before_pool2: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    del train  # no dropout or batch norm here
    norm = functools.partial(ops.lrn, **self.lrn)
    pool = functools.partial(ops.max_pool, window=3, stride=2, padding='SAME')
    x = pool(conv(64, *self.inits['conv1'], name='conv1')(x))
    x = norm(x)
    x = conv(64, *self.inits['conv2'], name='conv2')(x)
    x = pool(norm(x)) if self.norm2_before_pool2 else norm(pool(x))
    x = x.reshape(x.shape[0], -1)  # NHWC flatten, as TF's reshape
    x = nn.relu(dense(384, *self.inits['local3'], name='local3')(x))
    x = nn.relu(dense(192, *self.inits['local4'], name='local4')(x))
    return dense(self.num_classes, *self.inits['logits'], name='logits')(x)


@register('cifar_lrn')
def cifar_lrn(num_classes=10):
  """Recipe A (seeds 000/003) and C: the TF tutorial's 1,068,298-parameter net."""
  lrn = dict(depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75)
  inits = dict(conv1=(5e-2, 0.0), conv2=(5e-2, 0.1), local3=(0.04, 0.1),
              local4=(0.04, 0.1), logits=(1 / 192.0, 0.0))
  return LrnNet(num_classes, lrn, inits, norm2_before_pool2=True)


@register('cifar_cookbook')
def cifar_cookbook(num_classes=10):
  """Recipe B (seed 002): LRN after both pools, r=5/bias 2/alpha 1e-3; N(0.05) weights, zero biases."""
  lrn = dict(depth_radius=5, bias=2.0, alpha=1e-3, beta=0.75)
  inits = {name: (0.05, 0.0) for name in ('conv1', 'conv2', 'local3', 'local4', 'logits')}
  return LrnNet(num_classes, lrn, inits, norm2_before_pool2=False)


class MnistCnn(nn.Module):
  """Recipe D (seed 003): the TF 'Deep MNIST for experts' network."""
  num_classes: int = 10
  widths: tuple = (32, 64)  # the two 5x5 convolutions
  hidden: int = 1024  # the fully connected layer
  layer_init: tuple = (0.1, 0.1)  # every layer: (truncated-normal stddev, bias constant)
  dropout: float = 0.5  # keep_prob 0.5, in training only

  @nn.compact
  def __call__(self, x, train=False):
    pool = functools.partial(ops.max_pool, window=2, stride=2, padding='SAME')
    for i, width in enumerate(self.widths, start=1):
      x = pool(conv(width, *self.layer_init, f'conv{i}')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(dense(self.hidden, *self.layer_init, 'fc1')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(self.num_classes, *self.layer_init, 'fc2')(x)


@register('mnist_cnn')
def mnist_cnn(num_classes=10, **options):
  return MnistCnn(num_classes, **options)


class DeepCnn(nn.Module):
  """Recipe E (seed 000's cs231n sketch): [conv-ReLU, conv-ReLU, max pool 2x2] x 3 -> FC.

  The seed gives no widths: 3x3 convs of 64, 128, 256 channels (32 -> 16 -> 8 -> 4),
  He-normal weights and zero biases, then one fully connected layer to the classes.
  """
  num_classes: int = 10
  widths: tuple = (64, 128, 256)

  @nn.compact
  def __call__(self, x, train=False):
    he = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
    for block, width in enumerate(self.widths, start=1):
      for i in (1, 2):
        x = Conv(width, (3, 3), relu=True, kernel_init=he, name=f'conv{block}_{i}')(x)
      x = ops.max_pool(x, 2, 2, 'SAME')
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, kernel_init=he, name='fc')(x)


@register('cifar_deep')
def cifar_deep(num_classes=10, **options):
  return DeepCnn(num_classes, **options)


class FastNet(nn.Module):
  """Recipe G: airbench94's network (KellerJordan/cifar10-airbench, legacy/airbench94.py).

  A 2x2 patch-whitening convolution (VALID, with bias; its kernel fitted from the data:
  config.whiten, whitening.py) -> GELU; per width, conv3x3 -> max pool 2 -> batch norm ->
  GELU -> conv3x3 -> batch norm -> GELU; max pool 3 -> linear head without bias, its
  logits times `logit_scale`. Convolutions have no bias, PyTorch's default init and
  (dirac=True) identity filters first; batch norm has a frozen scale of 1 (no parameter,
  unless batch_norm_scale),
  a trained bias, and `batch_norm_momentum` in flax's convention (the kept fraction of the
  running average: PyTorch's momentum 0.4 is 0.6 here). GELU is the exact (erf) one, as
  torch.nn.GELU's default. Every field is a config.model_options key.
  """
  num_classes: int = 10
  widths: tuple = (64, 256, 256)
  whiten_size: int = 2
  batch_norm_momentum: float = 0.6
  batch_norm_epsilon: float = 1e-12
  batch_norm_scale: bool = False  # False: the scale is frozen at 1
  logit_scale: float = 1 / 9
  dirac: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    gelu = functools.partial(nn.gelu, approximate=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.batch_norm_momentum, epsilon=self.batch_norm_epsilon,
                             use_scale=self.batch_norm_scale, use_fast_variance=False)
    init = dirac() if self.dirac else TORCH_DEFAULT_INIT
    c = x.shape[-1]
    x = Conv(2 * c * self.whiten_size**2, (self.whiten_size,) * 2, padding='VALID',
             kernel_init=TORCH_DEFAULT_INIT, name='whiten')(x)
    x = gelu(x)
    for g, width in enumerate(self.widths, start=1):
      x = Conv(width, (3, 3), use_bias=False, kernel_init=init, name=f'group{g}_conv1')(x)
      x = gelu(norm(name=f'group{g}_norm1')(ops.max_pool(x, 2, 2, 'VALID')))
      x = Conv(width, (3, 3), use_bias=False, kernel_init=init, name=f'group{g}_conv2')(x)
      x = gelu(norm(name=f'group{g}_norm2')(x))
    x = ops.max_pool(x, 3, 3, 'VALID')
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.num_classes, use_bias=False, kernel_init=TORCH_DEFAULT_INIT,
                 name='head')(x)
    return x * self.logit_scale


@register('cifar_fast')
def cifar_fast(num_classes=10, **options):
  return FastNet(num_classes, **options)


# (channels, dropout rate after each conv's BN-ReLU), per group; Paddle's img_conv_group.
VGG16_CIFAR_GROUPS = ((64, (0.3, 0.0)), (128, (0.4, 0.0)), (256, (0.4, 0.4, 0.0)),
                      (512, (0.4, 0.4, 0.0)), (512, (0.4, 0.4, 0.0)))


# PaddlePaddle v2's default initialisers (trainer_config_helpers): img_conv_layer draws
# its kernel from N(0, sqrt(2 / (k * k * C_in))) (He normal, not truncated); every other
# weight from N(0, 1 / sqrt(fan_in)) ('initial_smart'); biases are 0, batch-norm scale 1.
PADDLE_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
PADDLE_FC_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')


class PaddleDropout(nn.Module):
  """PaddlePaddle v2's dropout (Layer::forwardDropOut): in training, zero each unit
  with probability `rate` WITHOUT rescaling the rest; at test, multiply by 1 - rate.

  Flax's nn.Dropout instead divides by 1 - rate in training. Where an unnormalised
  linear layer follows (the 0.5 dropout before VGG's fc2), that doubles its input.
  """
  rate: float

  @nn.compact
  def __call__(self, x, train):
    if not train:
      return x * (1.0 - self.rate)
    keep = ops.bernoulli(self.make_rng('dropout'), 1.0 - self.rate, x.shape)
    return jnp.where(keep, x, jnp.zeros_like(x))


class Vgg16Cifar(nn.Module):
  """Recipe F, CIFAR version (seed 004, PaddlePaddle): VGG-16 with batch norm and dropout.

  Each 3x3 conv is followed by batch norm + ReLU and dropout at the seed's rate,
  each group by a 2x2/2 max pool; then dropout 0.5 -> fc 512 (linear) -> BN + ReLU
  -> dropout 0.5 -> fc 512 (linear) -> fc to the classes. Paddle's semantics
  throughout: its initialisers and dropout (above); batch norm with moving-average
  momentum 0.9 and epsilon 1e-5, two-pass variance; under data parallelism its batch
  statistics are those of the global batch. The convs feed batch norm, so no bias
  (Paddle's conv bias gets a zero gradient there and stays at its initial 0).
  """
  num_classes: int = 10
  batch_norm_momentum: float = 0.9  # flax's convention: the kept fraction
  batch_norm_epsilon: float = 1e-5
  batch_norm_scale: bool = True  # False: the scale is frozen at 1

  @nn.compact
  def __call__(self, x, train=False):
    # Two-pass variance: flax's default E[x^2] - E[x]^2 cancels catastrophically in float32,
    # enough to make 1 and 8 devices (different summation orders) differ by 0.3%.
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.batch_norm_momentum, epsilon=self.batch_norm_epsilon,
                             use_scale=self.batch_norm_scale, use_fast_variance=False)
    dense = functools.partial(nn.Dense, kernel_init=PADDLE_FC_INIT)
    for g, (width, drops) in enumerate(VGG16_CIFAR_GROUPS, start=1):
      for i, rate in enumerate(drops, start=1):
        x = Conv(width, (3, 3), use_bias=False, kernel_init=PADDLE_CONV_INIT,
                 name=f'conv{g}_{i}')(x)
        x = nn.relu(norm(name=f'bn{g}_{i}')(x))
        if rate:
          x = PaddleDropout(rate)(x, train)
      x = ops.max_pool(x, 2, 2, 'SAME')
    x = x.reshape(x.shape[0], -1)
    x = PaddleDropout(0.5)(x, train)
    x = dense(512, name='fc1')(x)
    x = nn.relu(norm(name='bn_fc1')(x))
    x = PaddleDropout(0.5)(x, train)
    x = dense(512, name='fc2')(x)
    return dense(self.num_classes, name='logits')(x)


@register('cifar_vgg16')
def cifar_vgg16(num_classes=10, **options):
  return Vgg16Cifar(num_classes, **options)


class Vgg16ImageNet(nn.Module):
  """Recipe F, ImageNet shape (seed 004, TF): 13 3x3 convs + 3 fc, ~138M parameters.

  Xavier (Glorot uniform) weights, conv biases 0, fc biases 0.1, dropout on the
  fc layers. The seed uses fc width 2048; 4096 is VGG-16's, the default here.
  """
  num_classes: int = 1000
  fc_width: int = 4096

  @nn.compact
  def __call__(self, x, train=False):
    xavier = nn.initializers.glorot_uniform()
    for g, (width, repeats) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), 1):
      for i in range(1, repeats + 1):
        x = Conv(width, (3, 3), relu=True, kernel_init=xavier, name=f'conv{g}_{i}')(x)
      x = ops.max_pool(x, 2, 2, 'SAME')
    x = x.reshape(x.shape[0], -1)
    for i in (1, 2):
      x = nn.relu(nn.Dense(self.fc_width, kernel_init=xavier,
                           bias_init=nn.initializers.constant(0.1), name=f'fc{i}')(x))
      x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=xavier,
                    bias_init=nn.initializers.constant(0.1), name='fc3')(x)


@register('vgg16_imagenet')
def vgg16_imagenet(num_classes=1000, **options):
  return Vgg16ImageNet(num_classes, **options)


def param_count(params: Any) -> int:
  """Number of parameters (arrays or shape structs)."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
