"""How a run is put together: build(config, data, mesh) gives the train state (initial, or
its shapes for a checkpoint to fill) and the jitted steps. The one way the trainer
(loop.py), bench mode, prediction and the tests assemble a run, so the step they run is
the same function on the same checks.
"""
import dataclasses
import functools

import jax

from cnnjax import config as config_lib, data as data_lib, kernels, models, optim, parallel, train


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What building a run needs of its dataset (nothing is read: a description)."""
  num_classes: int
  image_shape: tuple  # (height, width, channels)
  num_train: int  # examples in the train split: schedules counted in epochs, batch checks

  @classmethod
  def of(cls, source, train_split):
    """A data.Source's description with config.train_split's size."""
    return cls(source.num_classes, tuple(source.image_shape), source.num_examples(train_split))


def input_shape(config, image_shape):
  """The model's input shape: the dataset's images, or their crop."""
  h, w, c = image_shape
  size = config.augment.crop_size
  return (size, size, c) if size else (h, w, c)


def weight_loss_terms(config):
  """config.weight_loss as ((layer, wl), ...) (config.validate checks the layers)."""
  return tuple(sorted(config.weight_loss.items()))


@dataclasses.dataclass(frozen=True)
class Run:
  """A config's state and jitted steps on a mesh. Every jitted function carries the mesh
  into its trace (parallel.scoped): nothing is left set for the process."""
  config: object
  data: DataSpec
  mesh: object
  learning_rate: object  # step -> learning rate (the schedule)
  state: train.TrainState  # initial (from config.seed), or abstract: shapes and shardings
  steps_per_epoch: int  # the feed's (data.steps_per_epoch)
  frozen: tuple = ()  # 'layer/param' names never trained (config.freeze_from_epoch 0)

  @property
  def replicated(self):
    return parallel.replicated(self.mesh)

  @property
  def batch_sharded(self):
    return parallel.batch_sharded(self.mesh)

  def jit(self, fn, **jit_kwargs):
    """fn jitted to run under this run's mesh (its outputs replicated unless told)."""
    return jax.jit(parallel.scoped(self.mesh, fn),
                   **{'out_shardings': self.replicated, **jit_kwargs})

  @functools.cached_property
  def eval_accumulate(self):
    """train.eval_accumulate jitted: (totals, state, batch) -> new totals, on the devices
    (it donates the totals it is given)."""
    return self.jit(functools.partial(train.eval_accumulate,
                                      augment_cfg=self.config.augment.lock()),
                    donate_argnums=0)

  def train_steps(self, fetch):
    """train.train_steps with the config's static settings bound, jitted: steps(state,
    inputs, data) runs one train step per entry of `inputs`, each batch from
    fetch(data, input) (feed.py), and reports each step's `learning_rate` (the schedule)
    among its metrics. It donates the state it is given (its buffers become the new
    state's); each length of `inputs` compiles once."""
    c = self.config
    la = c.lookahead
    return self.jit(
        functools.partial(train.train_steps, fetch=fetch, augment_cfg=c.augment.lock(),
                          weight_loss_terms=weight_loss_terms(c),
                          weight_loss_on=c.weight_loss_on, ema_decay=c.ema_decay,
                          learning_rate_fn=self.learning_rate,
                          label_smoothing=c.label_smoothing,
                          lookahead=((la.every, la.decay, la.power, c.num_train_steps)
                                     if la.every else None),
                          steps_per_epoch=self.steps_per_epoch, frozen=self.frozen),
        out_shardings=(self.replicated, self.replicated), donate_argnums=0)


def build(config, data, mesh, initial=True, fit_images=None):
  """The run of `config` on a dataset described by `data` (DataSpec), on `mesh`.

  Validates the config against all three first (config.validate: a bad value is a
  UserError before anything is computed). initial=True: the state initialised from
  config.seed, its config.whiten layer fitted to `fit_images` (uint8, the train split's
  first config.whiten.images) where given; False: its shapes, dtypes and shardings only
  (jax.eval_shape: nothing is computed), which a checkpoint restore fills.
  """
  config_lib.validate(config, data, mesh)
  learning_rate = optim.learning_rate_fn(config, data.num_train)
  steps_per_epoch = data_lib.steps_per_epoch(data.num_train, config.batch_size,
                                             config.input_shards or parallel.process_count(mesh))
  replicated = parallel.replicated(mesh)
  w = config.whiten
  fit = functools.partial(train.set_kernel, layer=w.layer) if w.layer else None
  init = jax.jit(functools.partial(
      train.create_train_state,
      model=models.create(config.model, data.num_classes, **config.model_options),
      tx=optim.make(config, learning_rate, steps_per_epoch),
      input_shape=input_shape(config, data.image_shape), ema=config.ema_decay > 0,
      lookahead=config.lookahead.every > 0, fit=fit), out_shardings=replicated)
  key = jax.random.PRNGKey(config.seed)
  # Initialising needs shapes only (its forward pass is dropped): no kernel choice is made
  # for its one-example batch. The jitted init is new here, so no cached trace of it
  # was made under another kernel mode.
  with kernels.using('xla'):
    shapes = jax.eval_shape(init, key)
    config_lib.validate(config, layers=shapes.params)  # weight_loss names real layers
    if initial:
      fit_data = None
      if fit is not None and fit_images is not None:  # the same on every process
        kernel = train.whitening_kernel(
            fit_images, layer_shape=shapes.params[w.layer]['kernel'].shape, eps=w.eps,
            augment_cfg=config.augment.lock())
        fit_data = jax.make_array_from_process_local_data(replicated, kernel)
      state = init(key, fit_data=fit_data)
    else:  # restore onto `replicated` on this process's devices, whatever topology saved it
      state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                           shapes)
  frozen = tuple(n for n in config_lib.param_names(shapes.params)
                 if config_lib.lookup(config.freeze_from_epoch, n) == 0)
  return Run(config, data, mesh, learning_rate, state, steps_per_epoch, frozen)
