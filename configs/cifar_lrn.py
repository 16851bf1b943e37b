"""Recipe A: the CIFAR-10 LRN network of seeds 000 and 003 (the TF tutorial model).

Adam 1e-3, batch 128, random 24x24 crop + flip + brightness 63 + contrast
0.2-1.8 + per-image standardization; weight loss 0.004 on local3 and local4.
The logits layer carries no weight loss, as in seed 003 (whose 3,000-step, ~73%
claim this reproduces) and the TF tutorial; seed 000 uses 0.004 there:
--config.weight_loss.logits=0.004.
"""
from cnnjax.config import base_config


def get_config():
  c = base_config()
  c.recipe = 'A: CIFAR-10 LRN network (seeds 000/003), Adam 1e-3'
  c.dataset = 'cifar10'
  c.model = 'cifar_lrn'
  c.batch_size = 128
  c.num_train_steps = 3000
  c.log_every = 10
  c.eval_every = 1000
  c.checkpoint_every = 500
  c.weight_loss = dict(conv1=0.0, conv2=0.0, local3=0.004, local4=0.004, logits=0.0)
  c.optimizer = 'adam'
  c.learning_rate = 1e-3
  c.schedule = 'constant'
  return c
