"""The model, the loss and the train/eval steps on real (small) CIFAR-10 splits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import augment, loop, models, state as state_lib, train
from tests.conftest import small_config


@pytest.fixture(scope='module')
def trainer():
  return loop.Trainer(small_config())


def test_recipe_a_has_the_tutorials_parameter_count():
  model = models.create('cifar_lrn', 10)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))['params']
  assert models.param_count(params) == 1_068_298


def test_initializers_draw_what_the_model_declares(trainer):
  # The declared (stddev, bias) per layer are checked against the seed in test_seed_values.
  inits = models.create(trainer.config.model, 10).inits
  for name, (stddev, bias) in inits.items():
    p = trainer.state.params[name]
    np.testing.assert_array_equal(p['bias'], np.float32(bias))
    w = np.asarray(p['kernel'])
    assert np.abs(w).max() <= 2 * stddev  # truncated at two standard deviations
    # A normal truncated at +-2 sigma (redrawn, not rescaled) has std 0.8796 sigma.
    assert abs(w.std() / stddev - 0.8796) < 0.03, name


def test_loss_is_cross_entropy_plus_hand_computed_weight_losses(trainer):
  params = trainer.state.params
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 24, 24, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  terms = state_lib.weight_loss_terms(trainer.config)
  loss, (ce, _, _) = train.loss_fn(params, trainer.state, images, labels, terms, 'kernels',
                                   jax.random.PRNGKey(0))

  logits = np.asarray(trainer.state.apply_fn({'params': params}, images), np.float64)
  log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                                                                  keepdims=True)) - logits.max(1, keepdims=True)
  expected_ce = -log_softmax[np.arange(8), np.asarray(labels)].mean()
  assert trainer.config.weight_loss  # the recipe has weight losses to check
  expected_wl = sum(wl * (np.asarray(params[name]['kernel'], np.float64) ** 2).sum() / 2
                    for name, wl in trainer.config.weight_loss.items())
  np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)
  np.testing.assert_allclose(loss, expected_ce + expected_wl, rtol=1e-5)


def test_short_training_lowers_the_loss(trainer):
  state = jax.tree.map(jnp.copy, trainer.state)  # train_step donates its input state
  state, metrics = trainer.train(state, 0, 40)
  losses = np.asarray(metrics['loss'])
  assert int(state.step) == 40 and losses.shape == (40,)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


def test_evaluation_counts_exactly_the_split_and_matches_unbatched(trainer):
  result = trainer.evaluate(trainer.state)
  assert result['count'] == 300  # not 3 * 128 = 384
  split = trainer.eval_split
  images = augment.preprocess(None, jnp.asarray(split.images), trainer.config.augment, train=False)
  logits = trainer.state.apply_fn({'params': trainer.state.params}, images)
  assert result['correct'] == int(jnp.sum(jnp.argmax(logits, -1) == split.labels))


class Sealed:
  """A device value the evaluation loop may pass along but not read: any conversion raises."""
  def __init__(self, value):
    self.value = value

  def _read(self, *args):
    raise AssertionError('the evaluation read its running totals before the end')

  __float__ = __int__ = __bool__ = __array__ = __index__ = item = tolist = _read


def test_evaluation_reads_the_device_once_and_sums_as_the_batches_do(trainer, monkeypatch):
  # Between batches the loop only passes the running totals back to the device (on a GPU
  # a read there would also trip jax's transfer guard; on the CPU the guard does not apply):
  # they come back in one jax.device_get at the end.
  from cnnjax import data, parallel
  reads, calls = [], []
  accumulate, device_get = trainer.eval_accumulate, jax.device_get
  def sealed_accumulate(totals, state, batch):
    calls.append(1)
    totals = jax.tree.map(lambda v: v.value if isinstance(v, Sealed) else v, totals)
    return {k: Sealed(v) for k, v in accumulate(totals, state, batch).items()}
  monkeypatch.setattr(trainer, 'eval_accumulate', sealed_accumulate)
  monkeypatch.setattr(jax, 'device_get', lambda x: reads.append(x) or device_get(
      {k: v.value for k, v in x.items()}))
  result = trainer.evaluate(trainer.state)
  assert len(reads) == 1 and sorted(reads[0]) == ['correct', 'count', 'loss_sum']
  per_batch = [accumulate(train.eval_totals_zero(), trainer.state,
                          parallel.put_batch(b, trainer.batch_sharding))
               for b in data.eval_batches(trainer.eval_split, trainer.config.eval_batch_size)]
  assert len(calls) == len(per_batch) > 1
  assert result['correct'] == sum(int(s['correct']) for s in per_batch)
  assert result['count'] == sum(int(s['count']) for s in per_batch) == len(trainer.eval_split)
  np.testing.assert_allclose(result['loss'] * result['count'],
                             sum(float(s['loss_sum']) for s in per_batch), rtol=1e-6)
