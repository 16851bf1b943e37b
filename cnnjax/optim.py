"""Optimizers and learning-rate schedules, built from the config by name."""
import optax

from cnnjax.errors import UserError

SCHEDULES = ('constant', 'exponential_decay')
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
  raise UserError(f'unknown schedule {config.schedule!r}; choose one of {", ".join(SCHEDULES)}')


def make(config, learning_rate):
  """The optax transformation named by config.optimizer, at `learning_rate` (a schedule)."""
  if config.optimizer == 'sgd':
    return optax.sgd(learning_rate)
  if config.optimizer == 'momentum':
    return optax.sgd(learning_rate, momentum=config.momentum)
  if config.optimizer == 'adam':
    # TF 1.x AdamOptimizer defaults (epsilon 1e-8, as optax's).
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)
  raise UserError(f'unknown optimizer {config.optimizer!r}; choose one of {", ".join(OPTIMIZERS)}')
