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

from cnnjax import augment, config as config_lib, ops, whitening


class TrainState(train_state.TrainState):
  """params + optimizer state + step, the run's base PRNG key, and the optional
  batch-norm statistics, weight averages and lookahead's slow weights ({'params',
  'batch_stats'}) (None when the recipe has none).

  The key for step s is fold_in(rng, s): a pure function of (seed, step), so a
  resumed run draws exactly the augmentations and dropout an uninterrupted one would.
  """
  rng: jax.Array
  batch_stats: Any = None
  ema_params: Any = None
  slow: Any = None


def create_train_state(key, model, tx, input_shape, ema=False, lookahead=False, fit=None,
                       fit_data=None):
  """The initial state; fit(params, fit_data) -> params, where given data, sets parameters
  fitted to the data (set_kernel: the whitening filters) before the averages and the
  optimizer start from them."""
  init_key, dropout_key, rng = jax.random.split(key, 3)
  variables = model.init({'params': init_key, 'dropout': dropout_key},
                         jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats')
  if fit is not None and fit_data is not None:
    params = fit(params, fit_data)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng,
                           batch_stats=batch_stats, ema_params=params if ema else None,
                           slow={'params': params, 'batch_stats': batch_stats} if lookahead
                           else None)


def whitening_kernel(images, *, layer_shape, eps, augment_cfg):
  """The patch-whitening filters (whitening.filters, on the host) of uint8 `images` under
  the evaluation preprocessing, for a conv kernel of `layer_shape`."""
  x = augment.preprocess(None, jnp.asarray(images), augment_cfg, train=False)
  kernel = whitening.filters(x, layer_shape[0], eps)
  assert kernel.shape == tuple(layer_shape), (kernel.shape, layer_shape)
  return kernel


def set_kernel(params, kernel, *, layer):
  """params with `layer`'s kernel replaced by `kernel` (create_train_state's fit)."""
  dtype = params[layer]['kernel'].dtype
  return {**params, layer: {**params[layer], 'kernel': kernel.astype(dtype)}}


WEIGHT_LOSS_ON = ('kernels', 'all')


def weight_loss(params, weight_loss_terms, on='kernels', frozen=()):
  """Sum over layers of wl * tf.nn.l2_loss(p): TF's 'losses' collection.

  `weight_loss_terms` is ((layer name or pattern, wl), ...), looked up as config.lookup
  does: a layer's own name, else the pattern matching it, else '*'. on='kernels': only
  kernels carry it (the TF seeds); on='all': every parameter of the layer, biases and
  batch-norm scale and offset too, whose gradient wl * p is PaddlePaddle's
  L2Regularization decay (and PyTorch's coupled weight_decay). `frozen`: 'layer/param'
  names left out, parameters never trained (PyTorch gives them no decay; counted, their
  constant term would only shift the reported loss).
  """
  wl_of = dict(weight_loss_terms)
  terms = []
  for name, layer in params.items():
    wl = config_lib.lookup(wl_of, name, 0.0)
    if not wl:
      continue
    decayed = (layer.items() if on == 'all' else
               [('kernel', layer['kernel'])] if 'kernel' in layer else [])
    terms += [wl * ops.l2_loss(p) for k, p in decayed if f'{name}/{k}' not in frozen]
  return sum(terms, jnp.float32(0))


def cross_entropy(logits, labels, label_smoothing=0.0):
  """Per-example tf.nn.sparse_softmax_cross_entropy_with_logits; with label_smoothing a,
  against (1 - a) one-hot + a / classes (torch's CrossEntropyLoss(label_smoothing=a))."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _variables(state, params):
  variables = {'params': params}
  if state.batch_stats is not None:
    variables['batch_stats'] = state.batch_stats
  return variables


def loss_fn(params, state, images, labels, weight_loss_terms, weight_loss_on, dropout_key,
            label_smoothing=0.0, frozen=()):
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
  ce = jnp.mean(cross_entropy(logits, labels, label_smoothing))
  return (ce + weight_loss(params, weight_loss_terms, weight_loss_on, frozen),
          (ce, logits, batch_stats))


def ema_update(ema_params, params, step, decay):
  """tf.train.ExponentialMovingAverage(decay, num_updates=step).apply(): the decay
  is min(decay, (1 + step) / (10 + step)), step being the updated global step."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params, params)


def lookahead_update(state: TrainState, every, decay, power, total_steps):
  """airbench's lookahead, after the update to state.step: at every `every`-th step the
  slow weights move by 1 - d towards the fast ones, d = decay * (step / total_steps) **
  power, and the fast take their value; at total_steps the fast take the slow ones' (d = 1)."""
  step = state.step
  periodic = step % every == 0
  progress = jnp.minimum(step / total_steps, 1.0)
  d = jnp.where(periodic, decay * progress ** power, 1.0)
  fast = {'params': state.params, 'batch_stats': state.batch_stats}
  due = periodic | (step == total_steps)
  moved = jax.tree.map(lambda s, f: s + (1 - d) * (f - s), state.slow, fast)
  pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(due, n, o), new, old)
  fast = pick(moved, fast)
  return state.replace(params=fast['params'], batch_stats=fast['batch_stats'],
                       slow=pick(moved, state.slow))


def step_keys(state: TrainState):
  """The step's (augmentation key, dropout key): both from (rng, step), so a resumed or
  re-dispatched step draws exactly what the uninterrupted run drew, and apart."""
  key = jax.random.fold_in(state.rng, state.step)
  return key, jax.random.fold_in(key, 1)


def train_step(state: TrainState, batch: dict[str, Any], *, augment_cfg, weight_loss_terms,
               weight_loss_on='kernels', ema_decay=0.0, learning_rate_fn=None,
               label_smoothing=0.0, lookahead=None, steps_per_epoch=None, frozen=()):
  """One optimizer step on a uint8 batch; augmentation and dropout keyed by (rng, step).

  learning_rate_fn: the optimizer's schedule, to report the step's rate among the
  metrics (computed here, the host never has to queue a computation of its own).
  lookahead: (every, decay, power, total_steps) of lookahead_update, or None.
  steps_per_epoch: the feed's, for augmentations that follow the epoch (alternating
  flip, from the batch's 'index' of each example in the split). frozen: the parameters
  never trained, left out of the weight loss.
  """
  key, dropout_key = step_keys(state)
  examples = None
  if steps_per_epoch and 'index' in batch:
    examples = (state.rng, batch['index'], state.step // steps_per_epoch)
  images = augment.preprocess(key, batch['image'], augment_cfg, train=True, examples=examples)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (ce, _, batch_stats)), grads = grad_fn(
      state.params, state, images, batch['label'], weight_loss_terms, weight_loss_on, dropout_key,
      label_smoothing, frozen)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema_params is not None:
    new_state = new_state.replace(ema_params=ema_update(
        state.ema_params, new_state.params, new_state.step, ema_decay))
  if lookahead is not None:
    new_state = lookahead_update(new_state, *lookahead)
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

  Uses the weight averages when the recipe keeps them (as the TF tutorial's eval), and
  the config's test-time augmentation (augment.tta_logits).
  """
  images = augment.preprocess(None, images, augment_cfg, train=False)
  params = state.params if state.ema_params is None else state.ema_params
  variables = _variables(state, params)
  return augment.tta_logits(lambda x: state.apply_fn(variables, x, train=False), images,
                            augment_cfg.tta)


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
