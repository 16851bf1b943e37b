"""benchmarks/tf_reference.py, the TF side of docs/RESULTS.md's recipe table: its evaluation
steps and its resume, which a long run (Recipe C's 100,000 steps) depends on."""
import importlib.util
import re

from tests.conftest import ROOT, recipe_config


def load_tf_reference():
  spec = importlib.util.spec_from_file_location(
      'tf_reference', ROOT / 'benchmarks' / 'tf_reference.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tf_reference_evaluates_every_eval_every_steps_and_resumes_its_weights_and_averages(
    tf, tmp_path, capsys):
  reference = load_tf_reference()
  # Recipe C: momentum slots and weight averages, both of which the checkpoint must bring back.
  config = recipe_config('cifar_tutorial', train_split='train[:512]', eval_split='test[:500]',
                         batch_size=32, log_every=1)
  first = reference.train_and_evaluate(config, 6, 0, str(tmp_path), checkpoint_every=3,
                                       eval_every=2)
  out = capsys.readouterr().out
  evaluated = re.findall(r'^step (\d+): precision @ 1 = [\d.]+ \((\d+) / 500\)$', out, re.M)
  assert [step for step, _ in evaluated] == ['2', '4']  # step 6 is the final evaluation
  final = re.findall(r'^precision @ 1 = [\d.]+ \((\d+) / 500\)', out, re.M)
  assert final == [str(round(first * 500))]
  assert sorted(p.name for p in tmp_path.glob('ckpt-*.index')) == ['ckpt-3.index', 'ckpt-6.index']

  # Resumed at its last step, it trains nothing and evaluates the same averaged weights.
  again = reference.train_and_evaluate(config, 6, 0, str(tmp_path))
  out = capsys.readouterr().out
  assert re.search(r'^resumed from .*ckpt-6 at step 6$', out, re.M)
  assert not re.search(r'^step \d+, loss', out, re.M)
  assert again == first

  # Resumed toward a later end, it goes on from step 6.
  reference.train_and_evaluate(config, 8, 0, str(tmp_path), eval_every=0)
  out = capsys.readouterr().out
  assert re.findall(r'^step (\d+), loss', out, re.M) == ['6', '7']
  assert not re.search(r'^step \d+: precision', out, re.M)
