"""Around training: metrics.jsonl, TensorBoard, progress, plots, predict, bench, errors."""
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import struct
import termios
import time

import numpy as np
import pytest
from PIL import Image

from cnnjax import bench, checkpoint, data, loop, predict, report, train, workdir as workdir_lib
from cnnjax.errors import UserError
from tests.conftest import ROOT, SMALL_RUN, as_flags, run_py, small_config

SMALL = dict(SMALL_RUN, batch_size=64, log_every=2, eval_every=3, checkpoint_every=4)
run = run_py


def train_run(workdir, steps, **overrides):
  result = run('--workdir', str(workdir), *as_flags(dict(SMALL, num_train_steps=steps,
                                                         **overrides)))
  assert result.returncode == 0, result.stderr
  return result


def history(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return ([r['step'] for r in records if r['kind'] == 'train'],
          [r['step'] for r in records if r['kind'] == 'eval'], records)


def tensorboard(workdir):
  """{tag: [(step, value)]} as TensorBoard shows them (purged steps hidden)."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'),
                                           size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 6-step run: train steps 0, 2, 4 logged, evaluations after 3 and 6 steps."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  result = train_run(workdir, 6)
  return workdir, result.stdout


def test_metrics_jsonl_and_tensorboard_hold_the_logged_steps(trained):
  workdir, stdout = trained
  train_steps, eval_steps, records = history(workdir)
  assert train_steps == [0, 2, 4] and eval_steps == [3, 6]
  logged = [float(x) for x in re.findall(r'^step \d+, loss = (\S+) ', stdout, re.M)]
  train_records = [r for r in records if r['kind'] == 'train']
  np.testing.assert_allclose([r['loss'] for r in train_records], logged, atol=0.005)
  for r in train_records:
    assert r['learning_rate'] == pytest.approx(1e-3) and r['examples_per_sec'] > 0
    assert r['wall_time'] > 1.7e9
  final = re.search(r'^step 6: precision @ 1 = (\S+) \((\d+)/100\)', stdout, re.M)
  assert records[-1]['precision'] == pytest.approx(float(final[1]), abs=1e-4)
  assert records[-1]['correct'] == int(final[2]) and records[-1]['count'] == 100
  board = tensorboard(workdir)
  assert [s for s, _ in board['train/loss']] == [0, 2, 4]
  np.testing.assert_allclose([v for _, v in board['train/loss']],
                             [r['loss'] for r in train_records], rtol=1e-6)
  assert [s for s, _ in board['eval/precision']] == [3, 6]
  assert {'train/learning_rate', 'train/examples_per_sec', 'eval/loss'} <= set(board)


def test_resume_continues_the_history_without_duplicates(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained[0], workdir)
  # As if killed after step 6 was logged and evaluated, before its checkpoint: the resumed
  # run redoes steps 4 and 5 and the evaluation at 6.
  shutil.rmtree(workdir / 'checkpoints' / '6')
  before = history(workdir)[2]
  train_run(workdir, 8)
  train_steps, eval_steps, records = history(workdir)
  assert train_steps == [0, 2, 4, 6] and eval_steps == [3, 6, 8]
  assert records[:3] == before[:3]  # what the checkpoint covers is kept as it was
  board = tensorboard(workdir)
  assert [s for s, _ in board['train/loss']] == [0, 2, 4, 6]
  assert [s for s, _ in board['eval/precision']] == [3, 6, 8]
  # Running a finished run again evaluates again, and records nothing twice.
  train_run(workdir, 8)
  assert history(workdir)[:2] == ([0, 2, 4, 6], [3, 6, 8])
  assert [s for s, _ in tensorboard(workdir)['eval/precision']] == [3, 6, 8]


def test_plots_at_the_end_and_in_plot_mode(trained, tmp_path):
  workdir, stdout = trained
  assert f'wrote {workdir}/plots/loss.png' in stdout
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'plots')
  result = run('--mode=plot', '--workdir', str(copy), config=None)
  assert result.returncode == 0, result.stderr
  for name in ('loss.png', 'accuracy.png'):
    with Image.open(copy / 'plots' / name) as image:
      assert image.format == 'PNG' and image.size[0] >= 400
  # A figure that cannot be written, a plots folder that cannot be made: one line each.
  (copy / 'plots' / 'loss.png').unlink()
  (copy / 'plots' / 'loss.png').mkdir()
  result = run('--mode=plot', '--workdir', str(copy), config=None)
  assert (result.returncode, result.stderr) == (
      2, f'error: cannot write {copy}/plots/loss.png: Is a directory\n')
  assert sorted(os.listdir(copy / 'plots')) == ['accuracy.png', 'loss.png']  # no temporary left
  shutil.rmtree(copy / 'plots')
  (copy / 'plots').write_text('')
  result = run('--mode=plot', '--workdir', str(copy), config=None)
  assert (result.returncode, result.stderr) == (
      2, f"error: plots folder '{copy}/plots' is not writable: {copy}/plots is a file\n")


def test_lines_of_metrics_jsonl_that_are_not_records_are_skipped_by_plot_mode_and_resume(
    trained, tmp_path):
  workdir, _ = trained
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  lines = (copy / 'metrics.jsonl').read_bytes().splitlines(keepends=True)
  records = [json.loads(line) for line in lines]
  not_records = [b'[1, 2]\n', b'{"step": 2, "loss": 1.0}\n', b'{"kind": "eval", "step": 3}\n',
                 b'{"kind": "train", "step": "4", "loss": 1.0, "learning_rate": 0.1, '
                 b'"examples_per_sec": 1.0, "wall_time": 0}\n', b'\xff\xfe edited\n', b'null\n']
  (copy / 'metrics.jsonl').write_bytes(
      b''.join(lines[:1] + not_records + lines[1:]) + b'{"kind": "tra')  # and a torn last line
  assert report.read_metrics(copy) == records
  result = run('--mode=plot', '--workdir', str(copy), config=None)
  assert result.returncode == 0 and not result.stderr, result.stderr
  assert (copy / 'plots' / 'loss.png').exists()
  report.Reporter(str(copy), start_step=6).close()  # a resume from the checkpoint at step 6
  assert history(copy)[2] == records


def restored_state(workdir):
  trainer = loop.Trainer(workdir_lib.load_saved_config(str(workdir)), for_training=False)
  ckpt = checkpoint.Checkpoints(str(workdir), 3, read_only=True)
  try:
    return trainer, ckpt.restore_latest(trainer.state, report=print)[1]
  finally:
    ckpt.close()


def test_predict_gives_the_eval_steps_classes(trained, tmp_path):
  workdir, _ = trained
  source = data.info('cifar10')
  test = source.load('test[:8]')
  paths = []
  for i, image in enumerate(test.images):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  tops = predict.predict(str(workdir), paths, k=3)
  names = source.class_names
  predicted = np.array([names.index(top[0][0]) for top in tops])

  trainer, state = restored_state(workdir)
  batch = {'image': test.images, 'label': predicted.astype(np.int32),
           'mask': np.ones(len(paths), bool)}
  sums = trainer.eval_accumulate(train.eval_totals_zero(), state, batch)
  assert int(sums['correct']) == len(paths)  # the eval step agrees with every prediction
  logits = np.asarray(train.eval_logits(state, test.images, augment_cfg=trainer.config.augment))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  for top, p in zip(tops, probs):
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert [prob for _, prob in top] == pytest.approx(sorted(p)[::-1][:3], abs=1e-5)

  # The command line: one line per image, the same top class.
  result = run('--mode=predict', '--workdir', str(workdir), '--images', *paths[:2], config=None)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()[-2:]
  for path, line, top in zip(paths, lines, tops):
    assert line.startswith(f'{path}: {top[0][0]} ')

  # --config.* without --config apply to config.json: test-time augmentation, here.
  config = workdir_lib.load_saved_config(str(workdir))
  config.augment.tta = 1
  mirrored = predict.predict(str(workdir), paths[:2], k=3, config=config)
  shown = lambda top: ', '.join(f'{name} {p:.1%}' for name, p in top)
  assert [shown(t) for t in mirrored] != [shown(t) for t in tops[:2]]  # tta=1 changes them
  result = run('--mode=predict', '--workdir', str(workdir), '--images', *paths[:2],
               '--config.augment.tta=1', config=None)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-2:] == [
      f'{path}: {shown(top)}' for path, top in zip(paths, mirrored)]


def test_predict_needs_the_workdir_alone_not_the_dataset(trained, tmp_path):
  """The run's dataset.json holds what predict needs of the dataset: with TensorFlow and
  TFDS unimportable and no data anywhere it classifies as with them. A workdir without the
  file (a run from before it) reads the dataset instead."""
  workdir = trained[0]
  config, source = workdir_lib.load_saved_config(str(workdir)), data.info('cifar10')
  with open(workdir / 'dataset.json') as f:
    assert json.load(f) == {
        'dataset': config.dataset, 'train_split': config.train_split,
        'class_names': source.class_names, 'image_shape': list(source.image_shape),
        'num_train': source.num_examples(config.train_split)}
  paths = [str(tmp_path / f'{i}.png') for i in range(3)]
  for path, image in zip(paths, source.load('test[:3]').images):
    Image.fromarray(image).save(path)
  args = ['--mode=predict', '--workdir', str(workdir), '--images', *paths]
  with_data = run(*args, config=None)
  assert with_data.returncode == 0, with_data.stderr
  nowhere = tmp_path / 'no_data'
  without = run(*args, config=None, without_tf=True, env={'TFDS_DATA_DIR': str(nowhere)})
  assert without.returncode == 0, without.stderr[-3000:]
  lines = lambda result: result.stdout.strip().splitlines()[-3:]
  assert lines(without) == lines(with_data) and lines(with_data)[0].startswith(f'{paths[0]}: ')
  assert not nowhere.exists()

  older = tmp_path / 'older'
  shutil.copytree(workdir, older)
  os.remove(older / 'dataset.json')
  assert predict.predict(str(older), paths) == predict.predict(str(workdir), paths)


DATASET_EDITS = {  # of dataset.json as the run wrote it (a dict), or of its text
    'torn': lambda text: text[:len(text) // 2],
    'a list': lambda d: [d],
    'names in a string': lambda d: {**d, 'class_names': ' '.join(d['class_names'])},
    'a 2-d shape': lambda d: {**d, 'image_shape': d['image_shape'][:2]},
    'a shape of strings': lambda d: {**d, 'image_shape': [str(v) for v in d['image_shape']]},
    'no train examples': lambda d: {**d, 'num_train': 0},
    'a missing field': lambda d: {k: v for k, v in d.items() if k != 'class_names'},
    'another dataset': lambda d: {**d, 'dataset': 'mnist'},
    'another train split': lambda d: {**d, 'train_split': 'train'},
}


@pytest.mark.parametrize('edit', DATASET_EDITS)
def test_a_dataset_json_not_as_written_or_of_another_split_is_not_used(tmp_path, edit):
  config = small_config()
  source = data.info(config.dataset)
  workdir_lib.write_dataset(config, source, str(tmp_path))
  assert workdir_lib.saved_dataset(config, str(tmp_path)) == {
      'class_names': source.class_names, 'image_shape': list(source.image_shape),
      'num_train': source.num_examples(config.train_split)}
  path = tmp_path / 'dataset.json'
  text = path.read_text()
  path.write_text(DATASET_EDITS[edit](text) if edit == 'torn' else
                  json.dumps(DATASET_EDITS[edit](json.loads(text))))
  assert workdir_lib.saved_dataset(config, str(tmp_path)) is None  # predict reads the data


def test_predict_takes_workdir_and_images_after_equals_with_a_leading_tilde(trained, tmp_path):
  (tmp_path / 'run').symlink_to(trained[0])
  for i, image in enumerate(data.info('cifar10').load('test[:2]').images):
    Image.fromarray(image).save(tmp_path / f'{i}.png')
  result = run('--mode=predict', '--workdir=~/run', '--images=~/0.png,~/1.png', config=None,
               env={'HOME': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()[-2:]
  assert [line.split(':')[0] for line in lines] == [str(tmp_path / f'{i}.png') for i in (0, 1)]
  assert not (ROOT / '~').exists()


def test_predict_runs_in_eval_batches_and_gets_what_one_batch_gets(trained):
  images = data.info('cifar10').load('test[:7]').images
  whole = predict.Predictor(str(trained[0])).probabilities(images)
  config = workdir_lib.load_saved_config(str(trained[0]))
  config.eval_batch_size = 3  # batches of 3, 3 and 1 padded to 3
  predictor = predict.Predictor(str(trained[0]), config)
  calls = []
  jitted = predictor._probabilities
  predictor._probabilities = lambda state, batch: calls.append(len(batch)) or jitted(state, batch)
  np.testing.assert_allclose(predictor.probabilities(images), whole, atol=1e-6)
  assert calls == [3, 3, 3]


def test_predict_converts_grayscale_and_resizes_with_the_seeds_lanczos_filter(trained, tmp_path):
  # A gray 64x48 picture with detail at every scale, so that resampling filters differ.
  gray = tmp_path / 'big-gray.png'
  rng = np.random.default_rng(0)
  ramp = np.tile(np.arange(64, dtype=np.uint8) * 2, (48, 1))
  Image.fromarray(ramp + rng.integers(0, 128, (48, 64), dtype=np.uint8)).save(gray)
  (top,) = predict.predict(str(trained[0]), [str(gray)], k=10)
  assert len(top) == 10 and sum(p for _, p in top) == pytest.approx(1.0, abs=1e-4)
  # ... as the same picture given as a 32x32 RGB image (gray in all three channels) resized
  # as seed 004's inference does, `im.resize((32, 32), Image.ANTIALIAS)`: Lanczos.
  predictor = predict.Predictor(str(trained[0]))
  def given_as(resample):
    rgb = np.asarray(Image.open(gray).convert('RGB').resize((32, 32), resample))
    (top,) = predictor.top_k(rgb[None], k=10)
    return top
  expected = given_as(Image.Resampling.LANCZOS)
  assert [name for name, _ in top] == [name for name, _ in expected]
  assert [p for _, p in top] == pytest.approx([p for _, p in expected], abs=1e-6)
  assert [p for _, p in top] != pytest.approx([p for _, p in given_as(Image.Resampling.BILINEAR)],
                                              abs=1e-6)  # the filter shows in the result


def test_progress_bar_on_a_terminal_lines_otherwise(tmp_path):
  controller, terminal = pty.openpty()
  # A terminal 100 columns wide (a new pty is 0 x 0, where the bar has no room).
  fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
  process = run('--workdir', str(tmp_path), *as_flags(dict(SMALL, num_train_steps=4,
                                                           eval_every=0)),
                wait=False, stdout=terminal, stderr=terminal)
  os.close(terminal)
  output, deadline = b'', time.monotonic() + 600
  while True:
    ready, _, _ = select.select([controller], [], [], max(deadline - time.monotonic(), 0))
    if not ready:  # a hung run must not hang the suite
      process.kill()
      raise AssertionError(f'no end after 600 s: {output[-2000:]!r}')
    try:
      chunk = os.read(controller, 65536)
    except OSError:  # the terminal closed
      break
    if not chunk:
      break
    output += chunk
  assert process.wait(timeout=600) == 0
  text = output.decode(errors='replace')
  assert re.search(r'100%\|.*\| 4/4 .*loss=', text)
  assert not re.search(r'^step \d+, loss = ', text, re.M)  # the bar replaces the lines
  assert 'step 4: precision @ 1' in text  # evaluations still get their line
  # The pipe case (this test's other runs) prints the seed's lines: see test_cli.py.


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.mark.parametrize('progress,stream,bar', [
    ('bar', io.StringIO, True), ('lines', _Terminal, False), ('auto', _Terminal, True),
    ('auto', io.StringIO, False)])
def test_progress_setting_chooses_bar_or_lines_whatever_the_stream(progress, stream, bar):
  out = stream()
  reporter = report.Reporter(None, 0, 4, progress, stream=out)
  for step in range(4):
    reporter.advance()
    reporter.train(step, 2.5, 0.1, 100.0, 0.01, 2.4)
  reporter.close()
  text = out.getvalue()
  assert bool(re.search(r'100%\|.*\| 4/4 .*loss=2\.500', text)) == bar, text
  assert len(re.findall(r'^step \d, loss = 2\.50 ', text, re.M)) == (0 if bar else 4), text


def test_eval_mode_takes_a_step_a_config_and_overrides_of_the_saved_one(trained):
  workdir, _ = trained
  _, _, records = history(workdir)
  evals = {r['step']: r for r in records if r['kind'] == 'eval'}
  line = r'^step {}: precision @ 1 = {:.4f} \({}/{}\)'
  latest = run('--mode=eval', '--workdir', str(workdir), config=None)  # the run's config.json
  assert latest.returncode == 0, latest.stderr
  r = evals[6]  # the latest checkpoint: the run's own last evaluation, again
  assert re.search(line.format(6, r['precision'], r['correct'], r['count']), latest.stdout,
                   re.M), latest.stdout
  earlier = run('--mode=eval', '--workdir', str(workdir), '--step', '4', config=None)
  assert earlier.returncode == 0, earlier.stderr
  assert 'restored the checkpoint at step 4' in earlier.stdout
  assert re.search(rf'^step 4: precision @ 1 = \S+ \(\d+/{r["count"]}\)', earlier.stdout, re.M)
  # --config replaces config.json: here, a smaller eval split.
  other = run('--mode=eval', '--workdir', str(workdir), *as_flags(dict(SMALL, eval_split='test[:40]')))
  assert other.returncode == 0, other.stderr
  assert re.search(r'^step 6: precision @ 1 = \S+ \(\d+/40\)', other.stdout, re.M), other.stdout
  # --config.* without --config apply to config.json: the run's train split, this eval split.
  overridden = run('--mode=eval', '--workdir', str(workdir), '--config.eval_split=test[:30]',
                   config=None)
  assert overridden.returncode == 0, overridden.stderr
  assert re.search(rf'^data: cifar10 {re.escape(SMALL["train_split"])}=\S+ examples, '
                   r'test\[:30\]=30 examples', overridden.stdout, re.M), overridden.stdout
  assert re.search(r'^step 6: precision @ 1 = \S+ \(\d+/30\)', overridden.stdout, re.M)
  missing = run('--mode=eval', '--workdir', str(workdir), '--step', '5', config=None)
  assert missing.returncode == 2 and 'no checkpoint at step 5' in missing.stderr
  assert 'available: 4, 6' in missing.stderr


def test_bench_overrides_shape_the_synthetic_input_and_model():
  config = small_config(batch_size=16, bench=dict(image_size=28, channels=1, num_classes=7))
  s = bench.Synthetic(config, steps_per_call=1)
  assert s.host_batch['image'].shape == (16, 28, 28, config.bench.channels)
  assert s.host_batch['label'].max() < config.bench.num_classes
  assert s.state.params['logits']['kernel'].shape[-1] == config.bench.num_classes
  assert s.state.params['conv1']['kernel'].shape[2] == config.bench.channels
  crop = config.augment.crop_size
  assert s.images.shape == (16, crop, crop, config.bench.channels)  # the model's input
  assert np.isfinite(float(s.train_once()))
  with pytest.raises(UserError, match=r'augment.crop_size=24 is larger than the 16x16 input'):
    bench.Synthetic(small_config(bench=dict(image_size=16)))


def test_bench_mode_prints_the_seeds_summary():
  result = run('--mode=bench', '--config.bench.steps=20', '--config.bench.burn_in=2',
               '--config.bench.batch_size=8')
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for name in ('Forward', 'Forward-backward'):
    match = re.search(rf': {name} across 20 steps, (\S+) \+/- (\S+) sec / batch '
                      r'\((\S+) ms; (\S+) examples/sec\)', out)
    assert match, out
    mean, std, ms, rate = map(float, match.groups())
    # All three printed rounded (%.3f s, %.2f ms, %.1f examples/sec): one mean step time
    # within half a unit of each last digit gives them all (at 10.498 ms: 0.010 and 10.50).
    seconds = (ms - 0.005) / 1000, (ms + 0.005) / 1000
    assert mean - 0.0005 - 1e-12 <= seconds[1] and seconds[0] <= mean + 0.0005 + 1e-12
    assert 8 / seconds[1] - 0.05 <= rate <= 8 / seconds[0] + 0.05 and std >= 0
  assert len(re.findall(r': step (0|10), duration = \d+\.\d{3}$', out, re.M)) == 4


@pytest.mark.parametrize('args,message', [
    (['--mode=fly'], "error: unknown mode 'fly' (modes: train, eval, predict, plot, bench, export)"),
    (['--mode=plot'], 'error: no metrics in {w}/metrics.jsonl: train there first'),
    (['--mode=predict', '--images', 'a.png'],
     'error: no config.json in {w}: pass --config, or train there first'),
    (['--mode=predict', '--images', 'a.png', '--config', 'configs/cifar_lrn.py'],
     'error: no checkpoints in {w}: train first, or point --workdir at a run'),
    # (a config that loads: without --config, a workdir without config.json is said first)
    (['--mode=predict', '--config', 'configs/cifar_lrn.py'],
     'error: --mode=predict needs image files: --images a.png b.jpg ...'),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
  result = run('--workdir', str(tmp_path), *args, config=None)
  assert result.returncode == 2
  assert result.stderr.strip() == message.format(w=tmp_path)


def test_unreadable_images_are_one_line_and_lose_nothing(trained, tmp_path):
  workdir, _ = trained
  before = sorted(os.listdir(workdir)), open(workdir / 'metrics.jsonl').read()
  text = tmp_path / 'notes.png'
  text.write_text('not an image')
  gone = tmp_path / 'gone.jpg'
  for path, message in ((text, f"error: cannot read image '{text}': UnidentifiedImageError"),
                        (gone, f"error: image '{gone}' does not exist"),
                        (tmp_path, f"error: image '{tmp_path}' is a folder: give its image files "
                                   f"({tmp_path}/*.png, say)")):
    result = run('--mode=predict', '--workdir', str(workdir), '--images', str(path), config=None)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(message)
  assert (sorted(os.listdir(workdir)), open(workdir / 'metrics.jsonl').read()) == before
