"""The train state and the jitted steps, built from a config: one home for the trainer
(loop.py), bench mode and prediction, so the step they run is the same function.
"""
import functools

import jax

from cnnjax import kernels, models, optim, train
from cnnjax.errors import UserError


def input_shape(config, image_shape):
  """The model's input shape: the dataset's images, or their crop."""
  h, w, c = image_shape
  size = config.augment.crop_size
  return (size, size, c) if size else (h, w, c)


def initial_state(config, num_classes, num_train, image_shape, sharding):
  """(model, learning-rate schedule, TrainState initialised from config.seed)."""
  model = models.create(config.model, num_classes)
  learning_rate = optim.learning_rate_fn(config, num_train)
  init = functools.partial(train.create_train_state, model=model,
                           tx=optim.make(config, learning_rate),
                           input_shape=input_shape(config, image_shape),
                           ema=config.ema_decay > 0)
  # Initialising needs shapes only (its forward pass is dropped): no kernel choice is made
  # for its one-example batch.
  with kernels.using('xla'):
    return model, learning_rate, jax.jit(init, out_shardings=sharding)(
        jax.random.PRNGKey(config.seed))


def weight_loss_terms(config, params):
  """config.weight_loss as ((layer, wl), ...), each layer checked against the model."""
  terms = tuple(sorted(config.weight_loss.items()))
  for name, _ in terms:
    if name != '*' and (name not in params or 'kernel' not in params[name]):
      raise UserError(f'bad config: weight_loss names {name!r}, which is not a layer of '
                      f'{config.model} (layers: {", ".join(params)})')
  return terms


def abstract_state(config, num_classes, num_train, image_shape, sharding):
  """The TrainState's shapes, dtypes and shardings (jax.eval_shape: nothing is computed),
  as a checkpoint restore needs them."""
  shapes = jax.eval_shape(lambda: initial_state(config, num_classes, num_train, image_shape,
                                                sharding)[2])
  # Restore onto `sharding` on this process's devices, whatever topology saved it.
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)


def jit_train_steps(config, params, sharding, fetch, learning_rate):
  """train.train_steps with the config's static settings bound, jitted: steps(state,
  inputs, data) runs one train step per entry of `inputs`, each batch from
  fetch(data, input) (feed.py), and reports each step's `learning_rate` (the schedule)
  among its metrics. It donates the state it is given (its buffers become the new
  state's); each length of `inputs` compiles once."""
  return jax.jit(
      functools.partial(train.train_steps, fetch=fetch, augment_cfg=config.augment.lock(),
                        weight_loss_terms=weight_loss_terms(config, params),
                        weight_loss_on=config.weight_loss_on, ema_decay=config.ema_decay,
                        learning_rate_fn=learning_rate),
      out_shardings=(sharding, sharding), donate_argnums=0)


def jit_eval_accumulate(config, sharding):
  """train.eval_accumulate jitted: accumulate(totals, state, batch) -> new totals, on the
  devices (it donates the totals it is given)."""
  return jax.jit(functools.partial(train.eval_accumulate, augment_cfg=config.augment.lock()),
                 out_shardings=sharding, donate_argnums=0)
