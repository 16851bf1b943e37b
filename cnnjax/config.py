"""The fields every recipe shares, with their defaults, and their validation.

configs/<recipe>.py start from base_config() and change what the recipe needs. Loading a
config imports no jax: validate() imports the name lists it checks against.
"""
import importlib.util

import ml_collections
from ml_collections import config_dict

from cnnjax.errors import UserError


def base_config():
  c = ml_collections.ConfigDict()
  c.recipe = ''  # a one-line description, printed at start
  # Data (TFDS). data_dir None: TFDS's default, which honours TFDS_DATA_DIR.
  c.dataset = 'cifar10'
  c.data_dir = config_dict.placeholder(str)
  c.download = True  # let TFDS download the data when it is not prepared
  c.train_split = 'train'
  c.eval_split = 'test'
  c.seed = 0
  # The train split is read as this many shards (0: one per process); the data
  # order is a function of (seed, input_shards), whatever the process count.
  c.input_shards = 0
  c.batch_size = 128
  c.eval_batch_size = 256
  # Where the train batches are gathered: 'true' puts the uint8 train split on the devices
  # once and gathers each batch there; 'false' gathers on the host and sends each batch;
  # 'auto' is 'true' where each device's part fits feed.DEVICE_MEMORY_FRACTION of its
  # memory (accelerators; the CPU reports none, so 'false'). Same batches either way.
  c.data_on_device = 'auto'
  # Loop.
  c.num_train_steps = 3000
  c.log_every = 10
  # Train steps per dispatch: this many run in one jitted lax.scan (fewer where an
  # evaluation, checkpoint or the end comes first). Same result for any value.
  c.steps_per_dispatch = 10
  c.eval_every = 1000  # 0: evaluate only at the end
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  # auto: a progress bar on an interactive terminal, log lines otherwise; or bar | lines.
  c.progress = 'auto'
  # Model and loss.
  c.model = 'cifar_lrn'
  # layer name -> wl, adding wl * tf.nn.l2_loss(kernel) to the loss; '*': every other layer.
  c.weight_loss = ml_collections.ConfigDict()
  # Which parameters of those layers: 'kernels' (TF's losses collection) or 'all'
  # (biases and batch-norm scale/offset too: PaddlePaddle's L2Regularization).
  c.weight_loss_on = 'kernels'
  # > 0: keep an exponential moving average of the params (TF's, with num_updates=step)
  # in the train state and evaluate with it.
  c.ema_decay = 0.0
  # Optimizer and schedule.
  c.optimizer = 'adam'  # sgd | momentum | adam
  c.learning_rate = 1e-3
  c.momentum = 0.9
  c.schedule = 'constant'  # constant | exponential_decay
  c.decay_rate = 0.1
  c.decay_steps = 0  # 0: use decay_epochs
  c.decay_epochs = 0.0
  c.staircase = True
  # Augmentation on the accelerator (augment.preprocess).
  c.augment = ml_collections.ConfigDict(dict(
      crop_size=24, train_crop='random', flip=True, brightness=63.0, contrast=(0.2, 1.8),
      scale='standardize'))
  # --mode=bench: synthetic input; 0 takes the value from batch_size / the dataset.
  c.bench = ml_collections.ConfigDict(dict(
      batch_size=0, image_size=0, channels=0, num_classes=0, steps=200, burn_in=10))
  return c


def load_file(path):
  """get_config() of a config file (configs/<recipe>.py), for scripts outside run.py."""
  spec = importlib.util.spec_from_file_location('recipe_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def no_augmentation(scale='unit'):
  """The augment block of a recipe that feeds whole images: no crop, flip or colour jitter."""
  return ml_collections.ConfigDict(dict(crop_size=0, train_crop='random', flip=False,
                                        brightness=0.0, contrast=(), scale=scale))


def validate(c, data=None, mesh=None, layers=None):
  """Raises UserError naming the first field with a value cnnjax cannot use: every check
  of a config is here. The fields alone always; with `data` (state.DataSpec) against the
  dataset, with `mesh` against the devices and processes, with `layers` (the model's
  params, or their shapes) the layers weight_loss names. state.build runs all of them."""
  from cnnjax import feed, models, optim, train  # jax, flax and optax: only when checking
  def need(ok, message):
    if not ok:
      raise UserError(f'bad config: {message}')
  need(c.model in models.names(), f'model={c.model!r} is not one of {", ".join(models.names())}')
  for field in ('batch_size', 'eval_batch_size', 'log_every', 'keep_checkpoints',
                'steps_per_dispatch'):
    need(c[field] > 0, f'{field} must be positive, got {c[field]}')
  for field in ('num_train_steps', 'eval_every', 'checkpoint_every', 'input_shards'):
    need(c[field] >= 0, f'{field} must be >= 0, got {c[field]}')
  need(c.learning_rate > 0, f'learning_rate must be positive, got {c.learning_rate}')
  need(c.optimizer in optim.OPTIMIZERS,
       f'optimizer={c.optimizer!r} is not one of {", ".join(optim.OPTIMIZERS)}')
  need(c.schedule in optim.SCHEDULES,
       f'schedule={c.schedule!r} is not one of {", ".join(optim.SCHEDULES)}')
  need(c.weight_loss_on in train.WEIGHT_LOSS_ON,
       f'weight_loss_on must be one of {", ".join(train.WEIGHT_LOSS_ON)}, '
       f'got {c.weight_loss_on!r}')
  need(0 <= c.ema_decay < 1, f'ema_decay must be in [0, 1), got {c.ema_decay}')
  need(c.data_on_device in feed.SETTINGS,
       f"data_on_device must be 'auto', 'true' or 'false', got {c.data_on_device!r}")
  need(c.get('progress', 'auto') in ('auto', 'bar', 'lines'),
       f"progress must be 'auto', 'bar' or 'lines', got {c.get('progress')!r}")
  need(c.augment.train_crop in ('random', 'central'),
       f"augment.train_crop must be 'random' or 'central', got {c.augment.train_crop!r}")
  need(c.augment.scale in ('standardize', 'unit'),
       f"augment.scale must be 'standardize' or 'unit', got {c.augment.scale!r}")
  need(len(c.augment.contrast) in (0, 2),
       f'augment.contrast must be (lower, upper) or (), got {c.augment.contrast}')
  if c.schedule == 'exponential_decay':
    need(c.decay_steps > 0 or c.decay_epochs > 0,
         'exponential_decay needs decay_steps > 0 or decay_epochs > 0')
  processes = 1 if mesh is None else len({d.process_index for d in mesh.devices.flat})
  shards = c.input_shards or processes  # as the trainer reads the train split
  if mesh is not None:
    devices = mesh.devices.size
    for field in ('batch_size', 'eval_batch_size'):
      need(c[field] % devices == 0, f'{field}={c[field]} does not divide evenly across '
           f'{devices} devices; use a multiple of {devices}')
    need(shards % processes == 0 and c.batch_size % shards == 0,
         f'input_shards={shards} must be a multiple of the {processes} process(es) and '
         f'divide batch_size={c.batch_size}')
  if data is not None:
    h, w, _ = data.image_shape
    crop = c.augment.crop_size
    need(not crop or crop <= min(h, w),
         f'augment.crop_size={crop} is larger than the {h}x{w} input')
    need(data.num_train // shards >= c.batch_size // shards,
         f'train split {c.train_split!r} has {data.num_train} examples, fewer than '
         f'batch_size={c.batch_size}')
  if layers is not None:
    for name in c.weight_loss:
      need(name == '*' or (name in layers and 'kernel' in layers[name]),
           f'weight_loss names {name!r}, which is not a layer of {c.model} '
           f'(layers: {", ".join(layers)})')
