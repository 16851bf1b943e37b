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
  """params + optimizer state + step, the run's base PRNG key, and the optional
  batch-norm statistics and weight averages (None when the recipe has none).

  The key for step s is fold_in(rng, s): a pure function of (seed, step), so a
  resumed run draws exactly the augmentations and dropout an uninterrupted one would.
  """
  rng: jax.Array
  batch_stats: Any = None
  ema_params: Any = None


def create_train_state(key, model, tx, input_shape, ema=False):
  init_key, dropout_key, rng = jax.random.split(key, 3)
  variables = model.init({'params': init_key, 'dropout': dropout_key},
                         jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables['params']
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng,
                           batch_stats=variables.get('batch_stats'),
                           ema_params=params if ema else None)


WEIGHT_LOSS_ON = ('kernels', 'all')


def weight_loss(params, weight_loss_terms, on='kernels'):
  """Sum over layers of wl * tf.nn.l2_loss(p): TF's 'losses' collection.

  `weight_loss_terms` is ((layer_name, wl), ...); the name '*' sets the wl of every
  layer not named. on='kernels': only kernels carry it (the TF seeds); on='all':
  every parameter of the layer, biases and batch-norm scale and offset too, whose
  gradient wl * p is PaddlePaddle's L2Regularization decay.
  """
  wl_of = dict(weight_loss_terms)
  default = wl_of.pop('*', 0.0)
  terms = []
  for name, layer in params.items():
    wl = wl_of.get(name, default)
    if not wl:
      continue
    decayed = layer.values() if on == 'all' else [layer['kernel']] if 'kernel' in layer else []
    terms += [wl * ops.l2_loss(p) for p in decayed]
  return sum(terms, jnp.float32(0))


def cross_entropy(logits, labels):
  """Per-example tf.nn.sparse_softmax_cross_entropy_with_logits."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _variables(state, params):
  variables = {'params': params}
  if state.batch_stats is not None:
    variables['batch_stats'] = state.batch_stats
  return variables


def loss_fn(params, state, images, labels, weight_loss_terms, weight_loss_on, dropout_key):
  """Mean cross-entropy + weight losses, as the seeds' tf.add_n(losses).

  Returns (loss, (cross_entropy, logits, new batch-norm statistics or None)).
  """
  rngs = {'dropout': dropout_key}
  if state.batch_stats is None:
    logits, batch_stats = state.apply_fn(_variables(state, params), images, train=True,
                                         rngs=rngs), None
  else:
    logits, updates = state.apply_fn(_variables(state, params), images, train=True, rngs=rngs,
                                     mutable=['batch_stats'])
    batch_stats = updates['batch_stats']
  ce = jnp.mean(cross_entropy(logits, labels))
  return ce + weight_loss(params, weight_loss_terms, weight_loss_on), (ce, logits, batch_stats)


def ema_update(ema_params, params, step, decay):
  """tf.train.ExponentialMovingAverage(decay, num_updates=step).apply(): the decay
  is min(decay, (1 + step) / (10 + step)), step being the updated global step."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params, params)


def train_step(state: TrainState, batch: dict[str, Any], *, augment_cfg, weight_loss_terms,
               weight_loss_on='kernels', ema_decay=0.0, learning_rate_fn=None):
  """One optimizer step on a uint8 batch; augmentation and dropout keyed by (rng, step).

  learning_rate_fn: the optimizer's schedule, to report the step's rate among the
  metrics (computed here, the host never has to queue a computation of its own).
  """
  key = jax.random.fold_in(state.rng, state.step)
  images = augment.preprocess(key, batch['image'], augment_cfg, train=True)
  dropout_key = jax.random.fold_in(key, 1)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (ce, _, batch_stats)), grads = grad_fn(
      state.params, state, images, batch['label'], weight_loss_terms, weight_loss_on, dropout_key)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema_params is not None:
    new_state = new_state.replace(ema_params=ema_update(
        state.ema_params, new_state.params, new_state.step, ema_decay))
  metrics = {'loss': loss, 'cross_entropy': ce}  # what the loop logs, nothing more
  if learning_rate_fn is not None:
    metrics['learning_rate'] = learning_rate_fn(state.step)
  return new_state, metrics


def train_steps(state: TrainState, inputs, data, *, fetch, **step_settings):
  """train_step once per entry of `inputs` (stacked on a leading step axis), in one lax.scan.

  fetch(data, input) gives each step's batch (feed.py). A scan of any length runs the
  same compiled step body, so K steps per dispatch train exactly as K dispatches of
  one (XLA compiles a loop body and a lone step differently, so the lone step would
  not). Returns the final state and each step's metrics, stacked.
  """
  def body(state, step_input):
    return train_step(state, fetch(data, step_input), **step_settings)
  return jax.lax.scan(body, state, inputs)


def eval_logits(state: TrainState, images, *, augment_cfg):
  """Logits of uint8 images under the recipe's evaluation preprocessing.

  Uses the weight averages when the recipe keeps them (as the TF tutorial's eval).
  """
  images = augment.preprocess(None, images, augment_cfg, train=False)
  params = state.params if state.ema_params is None else state.ema_params
  return state.apply_fn(_variables(state, params), images, train=False)


def eval_step(state: TrainState, batch: dict[str, Any], *, augment_cfg):
  """Sums over the real (mask 1) examples: top-1 correct, count, cross-entropy."""
  logits = eval_logits(state, batch['image'], augment_cfg=augment_cfg)
  mask = batch['mask']
  correct = (jnp.argmax(logits, -1) == batch['label']) & mask
  return {
      'correct': jnp.sum(correct),
      'count': jnp.sum(mask),
      'loss_sum': jnp.sum(jnp.where(mask, cross_entropy(logits, batch['label']), 0.0)),
  }


def eval_totals_zero():
  """eval_step's sums before the first batch: the running totals of an evaluation."""
  return {'correct': jnp.int32(0), 'count': jnp.int32(0), 'loss_sum': jnp.float32(0)}


def eval_accumulate(totals, state: TrainState, batch: dict[str, Any], *, augment_cfg):
  """totals + eval_step's sums for `batch`: an evaluation's counts stay on the device
  until it ends (one read, not three per batch)."""
  sums = eval_step(state, batch, augment_cfg=augment_cfg)
  return jax.tree.map(jnp.add, totals, sums)
