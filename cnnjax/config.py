"""The fields every recipe shares, with their defaults, and their validation.

configs/<recipe>.py start from base_config() and change what the recipe needs. Loading a
config imports no jax: validate() imports the name lists it checks against.
"""
import fnmatch
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
  c.model_options = ml_collections.ConfigDict()  # fields of the model's module (models.py)
  # Fit the kernel of this layer (a 2x2 conv's 'layer/kernel'; '' = none) as patch
  # whitening (whitening.py) from the first `images` of the train split, at the start.
  c.whiten = ml_collections.ConfigDict(dict(layer='', images=5000, eps=5e-4))
  # layer name -> wl, adding wl * tf.nn.l2_loss(kernel) to the loss; '*': every other layer.
  # Keys may be fnmatch patterns ('*norm*'): a layer takes its own name's entry, else the
  # one pattern matching it, else '*'.
  c.weight_loss = ml_collections.ConfigDict()
  # Which parameters of those layers: 'kernels' (TF's losses collection) or 'all'
  # (biases and batch-norm scale/offset too: PaddlePaddle's L2Regularization).
  c.weight_loss_on = 'kernels'
  # > 0: keep an exponential moving average of the params (TF's, with num_updates=step)
  # in the train state and evaluate with it.
  c.ema_decay = 0.0
  # every > 0: lookahead (airbench): every `every` steps, and at the last, slow weights
  # (params and batch-norm statistics) move to the fast ones by 1 - d, d = decay *
  # (step / num_train_steps) ** power (d = 1 at the last step), and the fast take them.
  c.lookahead = ml_collections.ConfigDict(dict(every=0, decay=0.95**5, power=3.0))
  c.label_smoothing = 0.0  # the targets of the cross-entropy: (1 - a) one-hot + a / classes
  # Optimizer and schedule.
  c.optimizer = 'adam'  # sgd | momentum | adam
  c.learning_rate = 1e-3
  c.momentum = 0.9
  c.nesterov = False  # for optimizer=momentum
  # Per parameter, by fnmatch patterns on 'layer/param' names ('*norm*/bias'), each name
  # taking its own entry, else the one pattern matching it: a factor on the learning
  # rate, and the epoch of the feed from which its updates stop (0: never trained).
  c.lr_multipliers = ml_collections.ConfigDict()
  c.freeze_from_epoch = ml_collections.ConfigDict()
  c.schedule = 'constant'  # constant | exponential_decay | triangular
  # triangular: lr * (start -> 1 linearly over the first peak_at of num_train_steps, then -> end)
  c.triangular = ml_collections.ConfigDict(dict(start=0.2, peak_at=0.23, end=0.07))
  c.decay_rate = 0.1
  c.decay_steps = 0  # 0: use decay_epochs
  c.decay_epochs = 0.0
  c.staircase = True
  # Augmentation on the accelerator (augment.preprocess), and test-time augmentation.
  c.augment = augmentation(crop_size=24, train_crop='random', flip=True, brightness=63.0,
                           contrast=(0.2, 1.8), scale='standardize')
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


def augmentation(**fields):
  """An augment block: every field off but those given (augment.preprocess says what each
  does). tta: test-time augmentation at evaluation (augment.tta_logits' level, 0 = none);
  mean and std: per channel, of [0, 1] pixels, for scale='normalize'."""
  block = dict(crop_size=0, train_crop='random', flip=False, alternating_flip=False,
               translate=0, brightness=0.0, contrast=(), scale='unit', mean=(), std=(), tta=0)
  unknown = set(fields) - set(block)
  if unknown:
    raise KeyError(f'unknown augment fields: {", ".join(sorted(unknown))}')
  return ml_collections.ConfigDict({**block, **fields})


def no_augmentation(scale='unit'):
  """The augment block of a recipe that feeds whole images: no crop, flip or colour jitter."""
  return augmentation(scale=scale)


def _patterns_matching(table, name):
  """The keys of `table` other than '*' that match `name` as fnmatch patterns."""
  return [k for k in table if k != '*' and fnmatch.fnmatchcase(name, k)]


def lookup(table, name, default=None):
  """table's entry for `name`: its own, else the one fnmatch pattern other than '*' that
  matches it (validate() rejects a name two match), else '*', else default."""
  if name in table:
    return table[name]
  matches = _patterns_matching(table, name)
  if matches:
    return table[matches[0]]
  return table.get('*', default)


def _check_patterns(need, field, table, names):
  """Each key of config.<field> names or matches something in `names`, and no name is
  matched by two patterns."""
  for key in table:
    need(key == '*' or any(fnmatch.fnmatchcase(n, key) for n in names),
         f'{field} names {key!r}, which matches none of {", ".join(names)}')
  for n in names:
    matches = _patterns_matching(table, n)
    need(n in table or len(matches) <= 1,
         f'{field}: {n!r} is matched by more than one of {", ".join(matches)}')


def path_name(path):
  """A parameter's 'layer/param' name from its tree path."""
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def param_names(params):
  """'layer/param' names of a params tree (or its shapes)."""
  import jax
  return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def validate(c, data=None, mesh=None, layers=None):
  """Raises UserError naming the first field with a value cnnjax cannot use: every check
  of a config is here. The fields alone always; with `data` (state.DataSpec) against the
  dataset, with `mesh` against the devices and processes, with `layers` (the model's
  params, or their shapes) the layers weight_loss names. state.build runs all of them."""
  from cnnjax import feed, models, optim, parallel, train  # jax, flax, optax: only when checking
  def need(ok, message):
    if not ok:
      raise UserError(f'bad config: {message}')
  need(c.model in models.names(), f'model={c.model!r} is not one of {", ".join(models.names())}')
  for field in ('batch_size', 'eval_batch_size', 'log_every', 'keep_checkpoints',
                'steps_per_dispatch'):
    need(c[field] > 0, f'{field} must be positive, got {c[field]}')
  for field in ('seed', 'num_train_steps', 'eval_every', 'checkpoint_every', 'input_shards'):
    need(c[field] >= 0, f'{field} must be >= 0, got {c[field]}')
  b = c.bench
  need(b.steps > 0, f'bench.steps must be positive, got {b.steps}')
  for field in ('burn_in', 'batch_size', 'image_size', 'channels', 'num_classes'):
    need(b[field] >= 0, f'bench.{field} must be >= 0 (0: from the config), got {b[field]}')
  need(c.learning_rate > 0, f'learning_rate must be positive, got {c.learning_rate}')
  need(c.optimizer in optim.OPTIMIZERS,
       f'optimizer={c.optimizer!r} is not one of {", ".join(optim.OPTIMIZERS)}')
  need(c.schedule in optim.SCHEDULES,
       f'schedule={c.schedule!r} is not one of {", ".join(optim.SCHEDULES)}')
  need(c.weight_loss_on in train.WEIGHT_LOSS_ON,
       f'weight_loss_on must be one of {", ".join(train.WEIGHT_LOSS_ON)}, '
       f'got {c.weight_loss_on!r}')
  need(0 <= c.ema_decay < 1, f'ema_decay must be in [0, 1), got {c.ema_decay}')
  need(c.lookahead.every >= 0, f'lookahead.every must be >= 0, got {c.lookahead.every}')
  need(0 <= c.lookahead.decay <= 1, f'lookahead.decay must be in [0, 1], got {c.lookahead.decay}')
  need(0 <= c.label_smoothing < 1, f'label_smoothing must be in [0, 1), got {c.label_smoothing}')
  need(c.optimizer != 'momentum' or 0 <= c.momentum < 1,
       f'momentum must be in [0, 1), got {c.momentum}')
  # A negative factor would climb the loss it is meant to descend.
  for field in ('weight_loss', 'lr_multipliers'):
    for key, value in c[field].items():
      need(value >= 0, f'{field}[{key!r}] must be >= 0, got {value}')
  need(not c.nesterov or c.optimizer == 'momentum',
       f'nesterov applies to optimizer=momentum, not {c.optimizer!r}')
  for key, epoch in c.freeze_from_epoch.items():
    need(epoch >= 0, f'freeze_from_epoch[{key!r}] must be >= 0, got {epoch}')
  if c.schedule == 'triangular':
    t = c.triangular
    need(0 < t.peak_at < 1, f'triangular.peak_at must be in (0, 1), got {t.peak_at}')
    need(t.start >= 0 and t.end >= 0,
         f'triangular.start and end must be >= 0, got {t.start} and {t.end}')
    need(c.num_train_steps > 0, 'schedule=triangular needs num_train_steps > 0')
  try:
    models.create(c.model, 10, **c.model_options)
  except TypeError as e:
    need(False, f'model_options {dict(c.model_options)} do not fit {c.model}: {e}')
  need(c.data_on_device in feed.SETTINGS,
       f"data_on_device must be 'auto', 'true' or 'false', got {c.data_on_device!r}")
  need(c.get('progress', 'auto') in ('auto', 'bar', 'lines'),
       f"progress must be 'auto', 'bar' or 'lines', got {c.get('progress')!r}")
  need(c.augment.train_crop in ('random', 'central'),
       f"augment.train_crop must be 'random' or 'central', got {c.augment.train_crop!r}")
  a = c.augment
  need(a.scale in ('standardize', 'unit', 'normalize'),
       f"augment.scale must be 'standardize', 'unit' or 'normalize', got {a.scale!r}")
  need(a.scale != 'normalize' or (len(a.mean) == len(a.std) > 0 and min(a.std) > 0),
       f'augment.scale=normalize needs a mean and a positive std per channel, got '
       f'mean={a.mean}, std={a.std}')
  need(a.crop_size >= 0, f'augment.crop_size must be >= 0 (0: no crop), got {a.crop_size}')
  need(a.translate >= 0, f'augment.translate must be >= 0, got {a.translate}')
  need(len(a.contrast) in (0, 2), f'augment.contrast must be (lower, upper) or (), got '
       f'{a.contrast}')
  # tf.image.random_brightness and random_contrast reject what these two reject.
  need(a.brightness >= 0, f'augment.brightness must be >= 0, got {a.brightness}')
  need(len(a.contrast) != 2 or 0 <= a.contrast[0] < a.contrast[1],
       f'augment.contrast must be (lower, upper) with 0 <= lower < upper, got {a.contrast}')
  need(a.tta in (0, 1, 2), f'augment.tta must be 0, 1 or 2, got {a.tta}')
  if c.schedule == 'exponential_decay':
    need(c.decay_steps > 0 or c.decay_epochs > 0,
         'exponential_decay needs decay_steps > 0 or decay_epochs > 0')
    need(c.decay_steps >= 0 and c.decay_epochs >= 0,
         f'decay_steps and decay_epochs must be >= 0, got {c.decay_steps} and {c.decay_epochs}')
    need(c.decay_rate > 0, f'decay_rate must be positive, got {c.decay_rate}')
  processes = 1 if mesh is None else parallel.process_count(mesh)
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
    need(a.translate < (crop or min(h, w)),
         f'augment.translate={a.translate} must be smaller than the images (reflect padding)')
    need(a.scale != 'normalize' or len(a.mean) == data.image_shape[2],
         f'augment.mean and std have {len(a.mean)} channel(s), the images '
         f'{data.image_shape[2]}')
    need(data.num_train // shards >= c.batch_size // shards,
         f'train split {c.train_split!r} has {data.num_train} examples, fewer than '
         f'batch_size={c.batch_size}')
  if layers is not None:
    decayed = [n for n in layers if c.weight_loss_on == 'all' or 'kernel' in layers[n]]
    _check_patterns(need, 'weight_loss', c.weight_loss, decayed)
    names = param_names(layers)
    _check_patterns(need, 'lr_multipliers', c.lr_multipliers, names)
    _check_patterns(need, 'freeze_from_epoch', c.freeze_from_epoch, names)
    w = c.whiten
    if w.layer:
      kernel = layers.get(w.layer, {}).get('kernel')
      need(kernel is not None and kernel.shape[0] == kernel.shape[1]
           and kernel.shape[3] == 2 * kernel.shape[0] ** 2 * kernel.shape[2],
           f'whiten.layer={w.layer!r} must be a conv layer of {c.model} with k x k x C x '
           f'2k²C kernel')
      need(w.images > 0, f'whiten.images must be positive, got {w.images}')
