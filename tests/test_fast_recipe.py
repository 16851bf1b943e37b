"""Recipe G (configs/cifar_fast.py, airbench94) and the general options it is built from:
the whitening fit, Dirac init, label smoothing, per-parameter rates and freezing,
Nesterov momentum, the triangular schedule, lookahead, alternating flip, translation and
test-time augmentation; then a short run of the recipe, exact across feeds, dispatch
sizes and a resume."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import (augment, checkpoint, config as config_lib, data, loop, models, ops, optim,
                    parallel, state as state_lib, train, whitening)
from configs.cifar_fast import AIRBENCH94
from tests import conftest
from tests.conftest import as_flags, assert_same_state, recipe_config, restore, run_py

KEY = jax.random.PRNGKey(0)


def config(**overrides):
  return recipe_config('cifar_fast', **overrides)


def init_params(c, shape=(32, 32, 3)):
  model = models.create(c.model, 10, **c.model_options)
  return model, model.init(KEY, jnp.zeros((1, *shape)))


def test_config_gives_each_group_airbenchs_step_and_decay():
  """PyTorch's SGD steps a group by lr_g * (batch * mean gradient + (wd / lr_g) * p) on the
  summed loss (lr_g: airbench's lr / kilostep, x bias_scaler for the 'norm' biases); ours
  by lr * multiplier * (mean gradient + weight_loss * p). Both factors must agree."""
  c, h = config(), AIRBENCH94
  kilostep = 1024 * (1 + 1 / (1 - h['momentum']))
  lr, wd = h['lr'] / kilostep, h['weight_decay'] * h['batch_size'] / kilostep
  _, variables = init_params(c)
  names = config_lib.param_names(variables['params'])
  trained = [n for n in names if n != 'whiten/kernel']  # airbench's requires_grad=False
  assert len(trained) == len(names) - 1
  for name in trained:
    lr_group = lr * (h['bias_scaler'] if 'norm' in name else 1.0)  # airbench's two groups
    multiplier = config_lib.lookup(c.lr_multipliers, name, 1.0)
    weight_loss = config_lib.lookup(c.weight_loss, name.split('/')[0], 0.0)
    assert c.learning_rate * multiplier == pytest.approx(lr_group * c.batch_size), name
    assert c.learning_rate * multiplier * weight_loss == pytest.approx(wd), name
  assert c.batch_size == h['batch_size'] and c.momentum == h['momentum'] and c.nesterov
  assert c.num_train_steps == math.ceil(50000 // c.batch_size * h['train_epochs'])
  config_lib.validate(c, layers=variables['params'])


def test_dirac_init_passes_each_conv_input_channel_through():
  c = config()
  _, variables = init_params(c)
  x = jax.random.normal(KEY, (2, 9, 9, max(c.model_options.widths)))
  convs = [n for n in variables['params'] if '_conv' in n]
  assert len(convs) == 2 * len(c.model_options.widths)
  for name in convs:
    kernel = variables['params'][name]['kernel']
    cin = kernel.shape[2]
    y = ops.conv2d(x[..., :cin], kernel, padding='SAME')
    np.testing.assert_allclose(y[..., :cin], x[..., :cin], atol=1e-6, err_msg=name)
    rest = np.asarray(kernel[..., cin:])  # the other filters keep PyTorch's default init
    bound = 1 / math.sqrt(9 * cin)
    assert rest.size == 0 or (np.abs(rest).max() <= bound and rest.std() > bound / 4), name


def test_batch_norm_has_frozen_scale_and_the_configs_momentum_and_epsilon():
  c = config()
  model, variables = init_params(c)
  norms = [n for n in variables['params'] if '_norm' in n]
  assert norms and all(set(variables['params'][n]) == {'bias'} for n in norms)  # no scale
  x = jax.random.normal(KEY, (4, 32, 32, 3)) * 3
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  name = norms[0]
  before, after = variables['batch_stats'][name]['mean'], updates['batch_stats'][name]['mean']
  # The batch mean: recover it from the update and check the kept fraction is the config's.
  m = c.model_options.batch_norm_momentum
  batch_mean = (after - m * before) / (1 - m)
  assert np.all(np.isfinite(batch_mean)) and not np.allclose(after, before)
  assert model.batch_norm_epsilon == models.FastNet.batch_norm_epsilon


def test_label_smoothing_matches_the_smoothed_targets_by_hand():
  c = config()
  a = c.label_smoothing
  logits = np.asarray(jax.random.normal(KEY, (5, 10)) * 3)
  labels = np.array([0, 3, 9, 3, 1])
  targets = (1 - a) * np.eye(10)[labels] + a / 10
  log_softmax = logits - logits.max(1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
  expected = -(targets * log_softmax).sum(1)
  np.testing.assert_allclose(train.cross_entropy(logits, labels, a), expected, rtol=1e-5)
  assert a > 0


def test_nesterov_multipliers_and_freezing_step_as_pytorchs_sgd_by_hand():
  """optim.make on the recipe's config against PyTorch's SGD(nesterov) written out:
  buf = m * buf + g; p -= lr_t * multiplier * (g + m * buf), nothing once frozen."""
  c = config(freeze_from_epoch={'whiten/kernel': 0.0, 'whiten/bias': 1.5})
  steps_per_epoch = 2  # whiten/bias frozen from step 3
  schedule = optim.learning_rate_fn(c, 50000)
  tx = optim.make(c, schedule, steps_per_epoch)
  params = {'whiten': {'kernel': jnp.ones((2,)), 'bias': jnp.ones((2,))},
            'group1_norm1': {'bias': jnp.ones((2,))}, 'head': {'kernel': jnp.ones((2,))}}
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  expected = jax.tree.map(np.asarray, params)
  buf = jax.tree.map(np.zeros_like, expected)
  m = c.momentum
  for step in range(5):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), expected)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    lr = float(schedule(step))
    for layer, param in [('whiten', 'kernel'), ('whiten', 'bias'), ('group1_norm1', 'bias'),
                         ('head', 'kernel')]:
      g = grads[layer][param]
      buf[layer][param] = m * buf[layer][param] + g
      factor = {'whiten/kernel': 0.0, 'whiten/bias': 1.0 if step < 3 else 0.0,
                'group1_norm1/bias': c.lr_multipliers['*norm*/bias']}.get(f'{layer}/{param}', 1.0)
      expected[layer][param] = expected[layer][param] - lr * factor * (g + m * buf[layer][param])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)
  assert np.array_equal(params['whiten']['kernel'], np.ones(2))


def test_triangular_schedule_is_airbenchs_get_lr():
  c = config()
  total, t = c.num_train_steps, c.triangular
  def get_lr(step):  # legacy/airbench94.py's, with the config's knots
    warmup_steps = int(total * t.peak_at)
    if step < warmup_steps:
      frac = step / warmup_steps
      return t.start * (1 - frac) + 1.0 * frac
    frac = (step - warmup_steps) / (total - warmup_steps)
    return 1.0 * (1 - frac) + t.end * frac
  schedule = optim.learning_rate_fn(c, 50000)
  steps = np.arange(total + 1)
  np.testing.assert_allclose(jax.vmap(schedule)(steps),
                             [c.learning_rate * get_lr(s) for s in steps], rtol=1e-5)


def test_lookahead_moves_the_slow_weights_and_resets_the_fast_as_by_hand():
  c = config()
  every, decay, power, total = (c.lookahead.every, c.lookahead.decay, c.lookahead.power,
                                c.num_train_steps)
  fast, slow = {'w': jnp.array([1.0, -2.0])}, {'w': jnp.array([0.5, 0.5])}
  stats, slow_stats = {'mean': jnp.array([3.0])}, {'mean': jnp.array([1.0])}
  state = train.TrainState.create(apply_fn=None, params=fast, tx=optax.sgd(0.1), rng=KEY,
                                  batch_stats=stats,
                                  slow={'params': slow, 'batch_stats': slow_stats})
  def at(step, total=total):
    return train.lookahead_update(state.replace(step=jnp.int32(step)), every, decay, power, total)
  untouched = at(every + 1)
  assert_same_state((untouched.params, untouched.slow), (fast, state.slow))
  for step, total_steps in ((every, total), (2 * every, 2 * every)):  # periodic; periodic and last
    d = decay * (step / total_steps) ** power
    moved = at(step, total_steps)
    want = 0.5 + (1 - d) * (np.array([1.0, -2.0]) - 0.5)
    np.testing.assert_allclose(moved.slow['params']['w'], want, rtol=1e-6)
    np.testing.assert_allclose(moved.params['w'], want, rtol=1e-6)
    np.testing.assert_allclose(moved.batch_stats['mean'], 1.0 + (1 - d) * 2.0, rtol=1e-6)
  assert total % every  # the recipe's last step is not periodic: the fast take the slow
  last = at(total)
  assert_same_state((last.params, last.batch_stats, last.slow),
                    (slow, slow_stats, state.slow))


def distinct_images(n, size=8):
  return jax.random.randint(KEY, (n, size, size, 3), 0, 256).astype(jnp.uint8)


def test_alternating_flip_mirrors_each_example_one_way_on_even_epochs_the_other_on_odd():
  c = config()
  cfg = c.augment.copy_and_resolve_references()
  cfg.translate = 0  # flips alone, so each output is the image or its mirror
  images = distinct_images(64)
  index = jnp.arange(1000, 1064)
  def flipped(step, epoch, order=slice(None)):
    key = jax.random.fold_in(KEY, step)  # each step has its own key: flips must not follow it
    out = augment.preprocess(key, images[order], cfg, True, examples=(KEY, index[order], epoch))
    plain = augment.preprocess(None, images[order], cfg, False)
    same = np.all(np.isclose(out, plain), axis=(1, 2, 3))
    mirror = np.all(np.isclose(out, plain[:, :, ::-1]), axis=(1, 2, 3))
    assert np.all(same != mirror)
    return mirror
  epoch0 = flipped(0, 0)
  assert 16 < epoch0.sum() < 48  # a fair coin per example
  np.testing.assert_array_equal(flipped(7, 1), ~epoch0)
  np.testing.assert_array_equal(flipped(11, 2), epoch0)
  np.testing.assert_array_equal(flipped(19, 3), ~epoch0)
  reversed_order = slice(None, None, -1)  # the bit follows the example, not its position
  np.testing.assert_array_equal(flipped(3, 0, reversed_order), epoch0[::-1])


def test_translation_is_a_window_of_the_reflect_padded_image_at_every_offset():
  pad = config().augment.translate
  images = distinct_images(400).astype(jnp.float32)
  out = np.asarray(augment.random_translate(KEY, images, pad))
  padded = np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  h, w = images.shape[1:3]
  seen = set()
  for i in range(len(images)):
    offsets = [(y, x) for y in range(2 * pad + 1) for x in range(2 * pad + 1)
               if np.array_equal(out[i], padded[i, y:y + h, x:x + w])]
    assert len(offsets) == 1
    seen.add(offsets[0])
  assert len(seen) == (2 * pad + 1) ** 2


def test_tta_equals_averaging_the_six_views_by_hand():
  c = config(model_options=dict(widths=(8, 16, 16)))
  model, variables = init_params(c)
  state = train.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  tx=optax.sgd(0.1), rng=KEY,
                                  batch_stats=variables['batch_stats'])
  images = jax.random.randint(KEY, (3, 32, 32, 3), 0, 256).astype(jnp.uint8)
  x = np.asarray(augment.normalize(images.astype(jnp.float32), c.augment.mean, c.augment.std))
  logits = lambda v: np.asarray(model.apply(variables, jnp.asarray(v), train=False))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  views = {'plain': (x, 0.25), 'up-left': (padded[:, :32, :32], 0.125),
           'down-right': (padded[:, 2:, 2:], 0.125)}
  expected = sum(w * (logits(v) + logits(v[:, :, ::-1])) for v, w in views.values())
  assert c.augment.tta == 2
  np.testing.assert_allclose(train.eval_logits(state, images, augment_cfg=c.augment), expected,
                             rtol=2e-5, atol=2e-6)


SHORT = conftest.SHORT_FAST
short = conftest.short_fast_config


def test_weight_loss_leaves_out_the_never_trained_whitening_kernel():
  """airbench's frozen kernel gets no decay; here its constant term would dominate the
  logged loss. Every other parameter carries its config weight loss."""
  c = config(model_options=dict(widths=(8, 16, 16)))
  run = state_lib.build(c, state_lib.DataSpec(10, (32, 32, 3), 50000), parallel.make_mesh())
  assert run.frozen == ('whiten/kernel',)
  params = run.state.params
  expected = sum(config_lib.lookup(c.weight_loss, layer) * float(np.sum(np.square(p))) / 2
                 for layer, ps in params.items() for name, p in ps.items()
                 if f'{layer}/{name}' != 'whiten/kernel')
  got = train.weight_loss(params, state_lib.weight_loss_terms(c), c.weight_loss_on, run.frozen)
  assert float(got) == pytest.approx(expected, rel=1e-5)
  everything = train.weight_loss(params, state_lib.weight_loss_terms(c), c.weight_loss_on)
  assert float(everything) > float(got)


def test_initial_state_whitens_the_first_train_images():
  c = short()
  trainer = loop.Trainer(c)
  source = data.info(c.dataset, c.data_dir, download=False)
  first = source.load(f'train[:{c.whiten.images}]').images
  x = augment.preprocess(None, first, c.augment, train=False)
  expected = whitening.filters(x, 2, c.whiten.eps)
  state = trainer.state
  for kernel in (state.params['whiten']['kernel'], state.slow['params']['whiten']['kernel']):
    np.testing.assert_allclose(kernel, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module')
def short_runs(tmp_path_factory):
  """The short run one step a dispatch from host batches, and seven a dispatch from data
  on the device with checkpoints at 17 and 34 (inside dispatch groups)."""
  runs = {}
  for name, overrides in {'one step, host batches': dict(steps_per_dispatch=1,
                                                         data_on_device='false'),
                          'seven steps, data on device': dict(
                              steps_per_dispatch=7, data_on_device='true',
                              checkpoint_every=17)}.items():
    workdir = tmp_path_factory.mktemp('run')
    runs[name] = (workdir, loop.train_and_evaluate(short(**overrides), str(workdir)))
  return runs


def test_short_recipe_g_run_learns_and_keeps_the_whitening_frozen(short_runs):
  workdir, result = short_runs['one step, host batches']
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['cross_entropy'] for r in records if r['kind'] == 'train']
  assert len(losses) == SHORT['num_train_steps']
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
  assert result['precision'] > 0.2 and result['count'] == 200
  first = loop.Trainer(short()).state
  np.testing.assert_allclose(result['state'].params['whiten']['kernel'],
                             first.params['whiten']['kernel'], rtol=1e-5, atol=1e-6)


def test_short_recipe_g_is_exact_across_feeds_dispatch_and_resume(short_runs):
  """The schedule and lookahead follow num_train_steps, so the interrupted run is the
  checkpointed one with its checkpoints after step 17 set aside, resumed."""
  (_, reference), (workdir, device_fed) = short_runs.values()
  assert_same_state(device_fed['state'], reference['state'])
  assert device_fed['precision'] == reference['precision']
  ckpt = checkpoint.Checkpoints(str(workdir), 5)
  try:
    assert ckpt.steps() == [17, 34, 40]
    ckpt.set_aside(18, 'later_checkpoints')
  finally:
    ckpt.close()
  resumed = loop.train_and_evaluate(short(steps_per_dispatch=7, data_on_device='true',
                                          checkpoint_every=17), str(workdir))
  assert_same_state(resumed['state'], reference['state'])


def assert_same_training(leaves, reference_leaves, tolerance=1e-5):
  """Leaf by leaf, the largest difference within `tolerance` of the reference leaf's
  largest value (+1e-6): float rounding from another summation order. Not element by
  element: the identity-initialised filters' off-identity entries are tiny updates whose
  gradients are small differences of large sums (batch norm follows), so rounding moves
  them by percents of themselves (seen: 2e-6 on entries of 1e-5, 1 vs 8 devices) but by
  ~4e-6 of the filter; a real difference (statistics over the wrong batch, a missed
  lookahead) moves a leaf by far more than 1e-5 of itself."""
  for a, b in zip(leaves, reference_leaves, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    worst, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
    assert worst <= tolerance * scale + 1e-6, f'{a.shape}: differs by {worst:.2e} (largest {scale:.2e})'


def test_short_recipe_g_on_eight_devices_trains_like_one(tmp_path):
  """run.py on 8 CPU devices against one: batch-norm statistics over the global batch, the
  lookahead, the schedule and the per-example flips (2 epochs, 16 steps) alike. At the
  recipe's rate (64x on the BN biases) float noise doubles every few steps (1 vs 8 devices
  differ by 5% after 12 steps); at 1/100 of it the runs agree to float rounding."""
  overrides = dict(SHORT, num_train_steps=16, steps_per_dispatch=8,
                   learning_rate=config().learning_rate / 100)
  reference = loop.train_and_evaluate(short(**overrides), str(tmp_path / 'one'))['state']
  flags = {k: v for k, v in overrides.items() if k not in ('model_options', 'whiten')}
  r = run_py('--workdir', str(tmp_path / 'eight'), *as_flags(flags),
             f'--config.model_options.widths={SHORT["model_options"]["widths"]}',
             f'--config.whiten.images={SHORT["whiten"]["images"]}',
             config='configs/cifar_fast.py',
             env={**conftest.EIGHT, **conftest.one_kernel_path()})
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'devices: 8 x ' in r.stdout
  eight = restore(tmp_path / 'eight', overrides['num_train_steps'], short(**overrides))
  assert_same_training(jax.tree.leaves((eight.params, eight.slow['params'])),
                       jax.tree.leaves((reference.params, reference.slow['params'])))
  # The running statistics average 16 batches' moments, each reduced over the global batch
  # in another order on 8 devices (seen: 1.9e-5 of the largest on jax 0.12, AVX-512).
  assert_same_training(jax.tree.leaves((eight.batch_stats, eight.slow['batch_stats'])),
                       jax.tree.leaves((reference.batch_stats, reference.slow['batch_stats'])),
                       tolerance=1e-4)


def test_short_recipe_g_on_two_processes_trains_like_one(tmp_path):
  """Two processes joined by jax.distributed (one device each, a train shard each) against
  this process alone on the same two shards; 1/100 of the rate, as on eight devices."""
  from tests.test_multiprocess import free_port, start
  overrides = dict(num_train_steps=16, steps_per_dispatch=8, input_shards=2,
                   learning_rate=config().learning_rate / 100)
  reference = loop.train_and_evaluate(short(**overrides), str(tmp_path / 'one'))
  port = free_port()
  extra = ['recipe=cifar_fast', *[f'{k}={v}' for k, v in overrides.items()]]
  procs = [start(2, i, port, tmp_path / 'two', tmp_path / f'two_{i}.npz', extra, recipe=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  two = [np.load(tmp_path / f'two_{i}.npz') for i in range(2)]
  leaves = jax.tree.leaves(reference['state'].params)
  for i, ours in enumerate(leaves):
    np.testing.assert_array_equal(two[0][f'arr_{i}'], two[1][f'arr_{i}'])
    assert_same_training([two[0][f'arr_{i}']], [ours])
  assert float(two[0]['precision']) == reference['precision']
