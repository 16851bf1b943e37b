"""VGG-16 at ImageNet shape (seed 004, TF version), for --mode=bench.

224x224x3 input, 1000 classes, ~138M parameters; batch 32 as the seed's
time_tensorflow_run. Training it needs a prepared TFDS imagenet2012.
"""
from cnnjax.config import base_config, no_augmentation


def get_config():
  c = base_config()
  c.recipe = 'F (ImageNet shape): VGG-16, 138M parameters'
  c.dataset = 'imagenet2012'
  c.model = 'vgg16_imagenet'
  c.batch_size = 32
  c.optimizer = 'momentum'
  c.learning_rate = 0.01
  c.weight_loss = {}
  c.augment = no_augmentation(scale='unit')  # pixels / 255
  return c
