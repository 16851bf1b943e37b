"""Recipe B: the TensorFlow Machine Learning Cookbook's "advanced CNN" (seed 002).

LRN after each pool (r=5, bias 2, alpha 1e-3), N(0.05) weights, zero biases, no
weight loss; plain SGD at 0.1 * 0.9 ** floor(step / 250); a central 24x24 crop
even in training, then flip, brightness 63, contrast 0.2-1.8, standardization.
Unlike the seed, evaluation uses undistorted test images (seed bug).
"""
from cnnjax.config import base_config


def get_config():
  c = base_config()
  c.recipe = 'B: TF cookbook advanced CNN (seed 002), SGD 0.1 x 0.9 every 250 steps'
  c.model = 'cifar_cookbook'
  c.batch_size = 128
  c.num_train_steps = 20000
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.weight_loss = {}
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.schedule = 'exponential_decay'
  c.decay_steps = 250
  c.decay_rate = 0.9
  c.staircase = True
  c.augment.train_crop = 'central'
  return c
