"""Recipe D: the MNIST CNN of seed 003 (TF's "Deep MNIST for experts").

conv 5x5x32 - pool - conv 5x5x64 - pool - fc 1024 - dropout (keep 0.5, training
only, its own PRNG stream) - fc 10; N(0.1) weights, 0.1 biases; Adam 1e-4,
batch 50, 20,000 steps; pixels scaled to [0, 1], no augmentation.
"""
from cnnjax.config import base_config, no_augmentation


def get_config():
  c = base_config()
  c.recipe = 'D: MNIST CNN (seed 003), Adam 1e-4, dropout 0.5'
  c.dataset = 'mnist'
  c.model = 'mnist_cnn'
  c.batch_size = 50
  c.eval_batch_size = 400
  c.num_train_steps = 20000
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 2000
  c.weight_loss = {}
  c.optimizer = 'adam'
  c.learning_rate = 1e-4
  c.augment = no_augmentation(scale='unit')  # pixels / 255
  return c
