"""Optimizers and learning-rate schedules, built from the config by name."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import config as config_lib
from cnnjax.errors import UserError

SCHEDULES = ('constant', 'exponential_decay', 'triangular')
OPTIMIZERS = ('sgd', 'momentum', 'adam')


def decay_steps(config, num_train_examples):
  """Steps between decays: `decay_steps`, else `decay_epochs` in steps as TF computes it.

  TF's tutorial: int(num_examples / batch_size * num_epochs_per_decay).
  """
  if config.decay_steps:
    return int(config.decay_steps)
  return int(num_train_examples / config.batch_size * config.decay_epochs)


def learning_rate_fn(config, num_train_examples):
  """step -> learning rate; exponential_decay is tf.train.exponential_decay."""
  if config.schedule == 'constant':
    return optax.constant_schedule(config.learning_rate)
  if config.schedule == 'exponential_decay':
    return optax.exponential_decay(
        init_value=config.learning_rate,
        transition_steps=decay_steps(config, num_train_examples),
        decay_rate=config.decay_rate,
        staircase=config.staircase)
  if config.schedule == 'triangular':
    return triangular(config.learning_rate, config.num_train_steps, **config.triangular)
  raise UserError(f'unknown schedule {config.schedule!r}; choose one of {", ".join(SCHEDULES)}')


def triangular(peak, total_steps, start, peak_at, end):
  """airbench's one-cycle schedule: peak * (start -> 1 linearly over the first
  int(peak_at * total_steps) steps, then 1 -> end at total_steps; end after)."""
  knots = np.array([0.0, int(peak_at * total_steps), total_steps], np.float32)
  factors = np.array([start, 1.0, end], np.float32)
  return lambda step: peak * jnp.interp(jnp.asarray(step, jnp.float32), knots, factors)


def _base(config, learning_rate):
  if config.optimizer == 'sgd':
    return optax.sgd(learning_rate)
  if config.optimizer == 'momentum':
    return optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov)
  if config.optimizer == 'adam':
    # TF 1.x AdamOptimizer defaults (epsilon 1e-8, as optax's).
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)
  raise UserError(f'unknown optimizer {config.optimizer!r}; choose one of {", ".join(OPTIMIZERS)}')


def make(config, learning_rate, steps_per_epoch=None):
  """The optax transformation named by config.optimizer, at `learning_rate` (a schedule),
  its updates scaled per parameter by config.lr_multipliers and stopped by
  config.freeze_from_epoch (epochs of `steps_per_epoch` steps)."""
  tx = _base(config, learning_rate)
  if not config.lr_multipliers and not config.freeze_from_epoch:
    return tx
  freeze_from_step = {k: round(epoch * (steps_per_epoch or 0))
                      for k, epoch in config.freeze_from_epoch.items()}
  return optax.chain(tx, per_parameter(dict(config.lr_multipliers), freeze_from_step))


def per_parameter(multipliers, freeze_from_step):
  """Each update times its parameter's multiplier (config.lookup on 'layer/param'), and
  zero from its freeze step on: a learning-rate factor per parameter, and frozen
  parameters (torch's requires_grad=False: no step, no weight decay)."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    def scale(path, u):
      name = config_lib.path_name(path)
      factor = config_lib.lookup(multipliers, name, 1.0)
      stop = config_lib.lookup(freeze_from_step, name)
      if stop is not None:
        factor = jnp.where(state.count < stop, factor, 0.0)
      return u if isinstance(factor, float) and factor == 1.0 else (u * factor).astype(u.dtype)
    return (jax.tree_util.tree_map_with_path(scale, updates),
            optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count)))
  return optax.GradientTransformation(init, update)
