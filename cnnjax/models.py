"""The recipes' networks as Flax modules, found by name through one registry.

Modules are pure: `model.apply(variables, images, train=...)`. Layer names are
the seeds' (conv1, local3, ...), so a config's `weight_loss` names them, and
kernels use TF's layouts (HWIO, in x out) so weights copy across unchanged.
"""
import functools
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


def create(name, num_classes, **kwargs):
  """The registered model `name`; KeyError lists the known names."""
  if name not in _MODELS:
    raise KeyError(f'unknown model {name!r}; known models: {", ".join(names())}')
  return _MODELS[name](num_classes=num_classes, **kwargs)


def truncated_normal(stddev):
  """tf.truncated_normal(stddev=s): N(0, s) cut at +-2s and redrawn (not rescaled)."""
  return nn.initializers.truncated_normal(stddev)


def conv(features, stddev, bias, name, size=5):
  return nn.Conv(features, (size, size), padding='SAME', name=name,
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
    x = pool(nn.relu(conv(64, *self.inits['conv1'], name='conv1')(x)))
    x = norm(x)
    x = nn.relu(conv(64, *self.inits['conv2'], name='conv2')(x))
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


def param_count(params: Any) -> int:
  return sum(int(jnp.size(p)) for p in jax.tree_util.tree_leaves(params))
