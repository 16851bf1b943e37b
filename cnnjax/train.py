"""The functional core of training: TrainState, loss, train_step, eval_step.

Everything here is a pure function of arrays and PRNG keys; the loop, I/O and
checkpoints live in loop.py. Static settings (model, augmentation, loss
terms) are bound with functools.partial before jax.jit.
"""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from cnnjax import augment, ops


class TrainState(train_state.TrainState):
  """params + optimizer state + step, and the base PRNG key of the run.

  The key for step s is fold_in(rng, s): a pure function of (seed, step), so a
  resumed run draws exactly the augmentations an uninterrupted one would.
  """
  rng: jax.Array


def create_train_state(key, model, tx, input_shape):
  init_key, rng = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx, rng=rng)


def weight_loss(params, coefficients):
  """Sum over layers of wl * tf.nn.l2_loss(kernel): TF's 'losses' collection.

  `coefficients` is ((layer_name, wl), ...); biases carry no weight loss.
  """
  return sum((wl * ops.l2_loss(params[name]['kernel']) for name, wl in coefficients if wl),
             jnp.float32(0))


def cross_entropy(logits, labels):
  """Per-example tf.nn.sparse_softmax_cross_entropy_with_logits."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def loss_fn(params, apply_fn, images, labels, coefficients):
  """Mean cross-entropy + weight losses, as the seeds' tf.add_n(losses)."""
  logits = apply_fn({'params': params}, images, train=True)
  ce = jnp.mean(cross_entropy(logits, labels))
  return ce + weight_loss(params, coefficients), (ce, logits)


def train_step(state: TrainState, batch: dict[str, Any], *, augment_cfg, coefficients):
  """One optimizer step on a uint8 batch; augmentation keyed by (rng, step)."""
  key = jax.random.fold_in(state.rng, state.step)
  images = augment.preprocess(key, batch['image'], augment_cfg, train=True)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (ce, logits)), grads = grad_fn(state.params, state.apply_fn, images, batch['label'],
                                        coefficients)
  metrics = {
      'loss': loss,
      'cross_entropy': ce,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
  }
  return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch: dict[str, Any], *, augment_cfg):
  """Sums over the real (mask 1) examples: top-1 correct, count, cross-entropy."""
  images = augment.preprocess(None, batch['image'], augment_cfg, train=False)
  logits = state.apply_fn({'params': state.params}, images, train=False)
  mask = batch['mask']
  correct = (jnp.argmax(logits, -1) == batch['label']) & mask
  return {
      'correct': jnp.sum(correct),
      'count': jnp.sum(mask),
      'loss_sum': jnp.sum(jnp.where(mask, cross_entropy(logits, batch['label']), 0.0)),
  }
