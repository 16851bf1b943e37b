"""Recipe C: the TF official CIFAR-10 tutorial (cited by seeds 002 and 003).

Recipe A's network with plain gradient descent at 0.1, decayed x0.1 every 350
epochs (staircase; int(50000 / 128 * 350) = 136,718 steps, so still 0.1 at
100k), and an exponential moving average of the weights (decay 0.9999,
num_updates = global step) kept in the train state and used for evaluation.
"""
from cnnjax.config import base_config


def get_config():
  c = base_config()
  c.recipe = 'C: TF CIFAR-10 tutorial, SGD 0.1 x 0.1 every 350 epochs, EMA 0.9999'
  c.model = 'cifar_lrn'
  c.batch_size = 128
  c.num_train_steps = 100000
  c.log_every = 10
  c.eval_every = 10000
  c.checkpoint_every = 1000
  c.weight_loss = dict(local3=0.004, local4=0.004)
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.schedule = 'exponential_decay'
  c.decay_epochs = 350.0
  c.decay_rate = 0.1
  c.staircase = True
  c.ema_decay = 0.9999
  return c
