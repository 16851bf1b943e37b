"""Recipe E: the deeper cs231n-style network of seed 000 (described, not coded there).

[conv3x3-ReLU, conv3x3-ReLU, max pool 2x2] x 3 on 32x32 input (32 -> 16 -> 8 -> 4)
-> fc to 10. The seed gives no widths or schedule; chosen here: widths 64/128/256,
He-normal init, SGD with momentum 0.9 at 0.01, x0.1 every 30 epochs, weight loss
5e-4 on every kernel, 100 epochs, left-right flips + per-image standardization.
"""
from cnnjax.config import base_config


def get_config():
  c = base_config()
  c.recipe = 'E: deeper cs231n-style CNN (seed 000), momentum SGD'
  c.model = 'cifar_deep'
  c.batch_size = 128
  c.num_train_steps = 39000  # 100 epochs of 390 steps
  c.log_every = 50
  c.eval_every = 3900
  c.checkpoint_every = 1000
  c.weight_loss = {'*': 5e-4}
  c.optimizer = 'momentum'
  c.momentum = 0.9
  c.learning_rate = 0.01
  c.schedule = 'exponential_decay'
  c.decay_epochs = 30.0
  c.decay_rate = 0.1
  c.augment.crop_size = 0
  c.augment.brightness = 0.0
  c.augment.contrast = ()
  return c
