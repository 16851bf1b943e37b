"""Recipe F: VGG-16 with batch norm on CIFAR-10 (seed 004, PaddlePaddle version).

Momentum 0.9; the seed's lr 0.1/128 and L2 rate 0.0002*128 on the summed batch
cost equal lr 0.1 and weight loss 0.0002 * l2_loss(kernel) on the mean cost; x0.1
every 100 epochs, batch 128, 200 epochs. Pixels scaled to [0, 1], no augmentation
(Paddle's CIFAR reader). Batch-norm statistics live in the train state.
"""
from cnnjax.config import base_config, no_augmentation


def get_config():
  c = base_config()
  c.recipe = 'F: VGG-16 with batch norm (seed 004), momentum 0.9'
  c.model = 'cifar_vgg16'
  c.batch_size = 128
  c.num_train_steps = 78125  # 200 epochs of 50,000 / 128
  c.log_every = 100
  c.eval_every = 3906
  c.checkpoint_every = 1000
  c.weight_loss = {'*': 0.0002}
  c.weight_loss_on = 'all'  # Paddle's L2Regularization decays every parameter
  c.optimizer = 'momentum'
  c.momentum = 0.9
  c.learning_rate = 0.1
  c.schedule = 'exponential_decay'
  c.decay_epochs = 100.0
  c.decay_rate = 0.1
  c.augment = no_augmentation(scale='unit')  # pixels / 255
  return c
