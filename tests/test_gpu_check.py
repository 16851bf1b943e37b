"""benchmarks/gpu_check.py's pieces that its one GPU call depends on, checked on the CPU: the
payload's wheels put on the path without pip, bench mode's figure read from bench mode's own
output, a run's median step read from the metrics.jsonl the loop writes, and PyTorch's best
read from the line benchmarks/torch_recipe_a.py prints."""
import ast
import importlib.util
import json
import statistics
import zipfile

import pytest

from tests.conftest import ROOT, SMALL_RUN, as_flags, run_code, run_py


@pytest.fixture(scope='module')
def gpu_check():
  spec = importlib.util.spec_from_file_location('gpu_check', ROOT / 'benchmarks' / 'gpu_check.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_wheel(path, module, source):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr(f'{module}/__init__.py', source)
    z.writestr(f'{path.name.split("-")[0]}-1.0.dist-info/METADATA', 'Name: x\nVersion: 1.0\n')


def test_install_missing_unpacks_only_the_wheels_whose_module_is_absent(
    gpu_check, tmp_path, monkeypatch, capsys):
  wheels = tmp_path / 'payload' / 'wheels'
  wheels.mkdir(parents=True)
  monkeypatch.setattr(gpu_check, 'PAYLOAD', tmp_path / 'payload')
  # tqdm is installed here, so its wheel must be left alone; the other module exists nowhere.
  monkeypatch.setattr(gpu_check, 'WHEELS', {'tqdm>=4': 'tqdm', 'cnnjax-probe-pkg>=1':
                                            'cnnjax_probe_pkg'})
  write_wheel(wheels / 'tqdm-99.0-py3-none-any.whl', 'tqdm', 'FROM_PAYLOAD = True\n')
  write_wheel(wheels / 'cnnjax_probe_pkg-1.0-py3-none-any.whl', 'cnnjax_probe_pkg', 'X = 7\n')
  site = tmp_path / 'site'
  gpu_check.install_missing(str(site))
  assert 'installed from the payload: cnnjax_probe_pkg\n' in capsys.readouterr().out
  seen = run_code('import cnnjax_probe_pkg, tqdm; '
                  'print(cnnjax_probe_pkg.X, hasattr(tqdm, "FROM_PAYLOAD"))',
                  env={'PYTHONPATH': str(site)})
  assert seen.stdout.split() == ['7', 'False'], seen.stderr


def test_bench_ms_reads_each_runs_own_figure_from_the_bench_script(gpu_check):
  runs = [('cifar_lrn', 16, 1), ('cifar_lrn', 16, 2)]
  result = run_code(gpu_check.BENCH, '4', json.dumps(runs))
  assert result.returncode == 0, result.stderr
  out = result.stdout + result.stderr
  printed = [float(line.split('(')[1].split(' ms')[0]) for line in out.splitlines()
             if 'Forward-backward across' in line]
  assert len(printed) == 2
  assert [gpu_check.bench_ms(out, *r) for r in runs] == printed
  assert gpu_check.bench_ms(out, 'cifar_lrn', 128, 1) is None  # a run that did not happen


def test_steps_median_leaves_out_the_first_logged_step(gpu_check, tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert gpu_check.steps_median(str(workdir), 'nothing', 10) is None  # no run yet
  result = run_py('--workdir', str(workdir), *as_flags(dict(
      SMALL_RUN, batch_size=32, num_train_steps=6, log_every=1, eval_every=0)))
  assert result.returncode == 0, result.stderr
  records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  seconds = [r['sec_per_batch'] for r in records if r['kind'] == 'train']
  assert len(seconds) == 6
  median = gpu_check.steps_median(str(workdir), "Recipe A's schedule", 3000)
  assert median == statistics.median(seconds[1:])
  assert f'at that rate: {3000 * median:.1f} s' in capsys.readouterr().out


def test_torch_best_reads_the_line_torch_recipe_a_prints(gpu_check):
  # torch is not installed here, so the script cannot run: its own `torch best:` f-string is
  # taken from its source and formatted with a best (examples/sec, mode) as main() holds it.
  source = (ROOT / 'benchmarks' / 'torch_recipe_a.py').read_text()
  lines = [node.args[0] for node in ast.walk(ast.parse(source))
           if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'print'
           and isinstance(node.args[0], ast.JoinedStr)
           and str(getattr(node.args[0].values[0], 'value', '')).startswith('torch best:')]
  assert len(lines) == 1
  line = eval(compile(ast.Expression(lines[0]), 'torch_recipe_a.py', 'eval'),
              {'best': (23456.4, 'reduce-overhead')})
  output = f'torch eager: 9.000 ms/step, 14,222 examples/sec\n{line}\n'
  assert gpu_check.torch_best(output) == ('reduce-overhead', 23456.0)
  assert gpu_check.torch_best('torch eager: 9.000 ms/step, 14,222 examples/sec\n') is None
