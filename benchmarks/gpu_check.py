"""The GPU check in one call of at most 10 minutes, on a GPU machine as the project borrows
it: one H100/H200, Python 3.12, jax with its CUDA plugin, flax, optax, orbax and PyTorch;
no TensorFlow, TFDS or ml-collections; no internet; 64 MiB taken along.

1. Here, on a machine with the project installed, CIFAR-10 in TFDS and a package registry:

       python benchmarks/gpu_check.py prepare

   writes gpu_payload/ (git-ignored, about 58 MB): the wheels the GPU image lacks
   (ml-collections, PyYAML, tensorboardX, protobuf, tqdm, for CPython 3.12 on manylinux)
   and cifar10_part.npz, CIFAR-10's train[:16384] and test[:2000] as an arrays file
   (run.py --mode=export; the whole train split, 147 MiB, does not fit in 64 MiB).
2. There, from the repository root with gpu_payload/ in it (the device tool: carry
   ["gpu_payload"]):

       python3 benchmarks/gpu_check.py 2>&1 | tail -100

   unpacks the wheels whose module is missing into a scratch directory (no pip), then prints,
   each part under its own time limit (a part that overruns is cut and the next starts):
     a. versions, the device and what it reports of its memory;
     b. the main job: Recipe A's 3,000 steps through the real loop (run.py, the data on
        the device by data_on_device=auto, its 3 evaluations and 6 checkpoints) on the
        arrays file: its wall time, and the steps' median from metrics.jsonl;
     c. bench mode, Recipe A at batch 128 and 1024, K = 1 and 10 steps per dispatch;
     d. PyTorch's Recipe A step at batch 128 (eager, torch.compile, CUDA graphs);
     d2. Recipe G (airbench94): its 476 steps of 1,024 through the real loop on the arrays
        file (16 steps an epoch there, so ~30 epochs of the part: the time is the recipe's,
        the accuracy is not), with the steps' median and the run projected from it; and
        benchmarks/torch_recipe_g.py on the same file, the same 476 steps, torch.compile
        and float16 (airbench's own setting), its whole-run wall time (compilation is
        outside it: a warm-up, timed on its own line, compiles first);
     e. bench mode for B to F at batch 128, K = 1 and 10;
     f. one epoch (390 steps of 128) of E and of F through the real loop, timed, with
        their full schedules (100 and 200 epochs) projected from it;
     g. what an asynchronous checkpoint save costs Recipe A's loop
        (benchmarks/checkpoint_cost.py).
   Bench mode's runs share one process (its start and jax's are paid once). The parts
   stop starting when --budget seconds (default 570) have gone: the call stays inside the
   device tool's 10 minutes, the latest parts cut first. --quick: a handful of steps per
   part (to check the script on a CPU).
Results go to docs/RESULTS.md by hand, with the printed versions and device.
"""
import argparse
import glob
import importlib.util
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAYLOAD = ROOT / 'gpu_payload'
DATA = PAYLOAD / 'cifar10_part.npz'
WHEELS = {  # requirement -> the module that shows it is installed
    'ml-collections>=1.1,<2': 'ml_collections', 'PyYAML>=6': 'yaml',
    'tensorboardX>=2.6': 'tensorboardX', 'protobuf>=4.25,<7': 'google.protobuf',
    'tqdm>=4.66': 'tqdm'}
BENCH_A = 'c. bench mode, Recipe A, batch 128 and 1024, K = 1 and 10'
TORCH_A = "d. PyTorch, Recipe A's step, batch 128"
EPOCH = 390  # CIFAR-10's 50,000 examples in batches of 128
FULL = {'cifar_deep': ('100 epochs', 39000), 'cifar_vgg16': ('200 epochs', 78125)}


def prepare():
  (PAYLOAD / 'wheels').mkdir(parents=True, exist_ok=True)
  for what, command in (
      ('downloading the wheels', [
          sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:',
          '--python-version', '3.12', '--platform', 'manylinux2014_x86_64', '--platform',
          'manylinux_2_17_x86_64', '-d', str(PAYLOAD / 'wheels'), *WHEELS]),
      ('exporting CIFAR-10', [
          sys.executable, 'run.py', '--mode=export', '--config', 'configs/cifar_lrn.py',
          '--out', str(DATA), '--config.train_split=train[:16384]',
          '--config.eval_split=test[:2000]'])):
    if subprocess.run(command, cwd=ROOT).returncode:  # its own error is printed above
      sys.exit(f'error: prepare stopped: {what} failed')
  size = sum(f.stat().st_size for f in PAYLOAD.rglob('*') if f.is_file())
  print(f'{PAYLOAD}: {size / 2**20:.1f} MiB')


def has(module):
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def install_missing(site):
  """The payload's wheels whose module this Python lacks, unpacked into `site` (put on
  PYTHONPATH). Unpacking is a wheel's whole install where, as in these five, it has no
  .data directory; so pip is not needed there."""
  by_name = {req.split('>')[0].lower().replace('-', '_'): module for req, module in WHEELS.items()}
  wheels = {os.path.basename(w).split('-')[0]: w  # distribution name -> its wheel
            for w in sorted(glob.glob(str(PAYLOAD / 'wheels' / '*.whl')))}
  missing = [name for name in wheels if not has(by_name.get(name.lower(), '?'))]
  for name in missing:
    with zipfile.ZipFile(wheels[name]) as z:
      z.extractall(site)
  print('installed from the payload:', ', '.join(missing) or 'nothing (all present)', flush=True)


DEADLINE = [float('inf')]  # time.perf_counter() at which no part may still run


OUTPUT = {}  # part name -> its output, for the summary


def part(name, limit, command, keep=None):
  """Runs `command` (argv) under `limit` seconds (less where the budget ends sooner);
  prints its lines (those matching `keep`, a tuple of substrings, if given), its wall time."""
  limit = min(limit, DEADLINE[0] - time.perf_counter())
  if limit < 10:
    print(f'=== {name}: skipped, the time budget is spent', flush=True)
    return
  limit = int(limit)
  print(f'=== {name}', flush=True)
  start = time.perf_counter()
  try:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    out, status = result.stdout + result.stderr, f'exit {result.returncode}'
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b'').decode() + (e.stderr or b'').decode() if isinstance(
        e.stdout, bytes) else (e.stdout or '') + (e.stderr or '')
    status = f'cut at {limit} s'
  except OSError as e:  # no such program
    out, status = '', f'not run: {e}'
  OUTPUT[name] = out
  lines = [l for l in out.splitlines() if keep is None or any(k in l for k in keep)]
  if not status.startswith('exit 0'):
    lines += out.splitlines()[-5:]
  print('\n'.join(lines))
  print(f'--- {name}: {status}, wall {time.perf_counter() - start:.1f} s', flush=True)


# Bench mode's runs in one process: argv = steps, [[config, batch, K], ...].
BENCH = """
import json, sys
from cnnjax import bench, config as config_lib
for name, batch, k in json.loads(sys.argv[2]):
  c = config_lib.load_file(f'configs/{name}.py')
  c.bench.batch_size, c.bench.steps, c.steps_per_dispatch = batch, int(sys.argv[1]), k
  print(f'bench: {name}, batch {batch}, K = {k}', flush=True)
  bench.run(c)
"""


def steps_median(workdir, what, steps):
  """The median train-step seconds of a run (its first logged step, compilation, left out)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  records = [json.loads(l) for l in open(path)]
  train = [r['sec_per_batch'] for r in records if r['kind'] == 'train'][1:]
  if not train:
    return None
  median = statistics.median(train)
  print(f'train steps: median {median * 1e3:.3f} ms/step; {what} ({steps:,} steps) at that '
        f'rate: {steps * median:.1f} s', flush=True)
  return median


def bench_ms(output, config, batch, k):
  """Bench mode's forward-backward ms/step for (config, batch, K) in a part's output."""
  found = re.search(rf'^bench: {config}, batch {batch}, K = {k}\n(?:.*\n)*?.*Forward-backward '
                    r'across \d+ steps, \S+ \+/- \S+ sec / batch \(([\d.]+) ms', output, re.M)
  return float(found.group(1)) if found else None


def torch_best(output):
  """(mode, examples/sec) from benchmarks/torch_recipe_a.py's `torch best:` line, or None."""
  found = re.search(r'^torch best: (\S+), ([\d,]+) examples/sec$', output, re.M)
  return (found.group(1), float(found.group(2).replace(',', ''))) if found else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('what', nargs='?', choices=['prepare', 'run'], default='run')
  parser.add_argument('--quick', action='store_true', help='a handful of steps per part')
  parser.add_argument('--budget', type=float, default=570, help='seconds for all parts')
  parser.add_argument('--dataset', default=str(DATA),
                      help='config.dataset for the real-loop parts: the arrays file, or a '
                      'TFDS name (cifar10) where TFDS and the whole dataset are at hand')
  args = parser.parse_args()
  DEADLINE[0] = time.perf_counter() + args.budget
  if args.what == 'prepare':
    return prepare()
  if args.dataset.endswith('.npz') and not os.path.exists(args.dataset):
    sys.exit(f'error: no {args.dataset}: run `python benchmarks/gpu_check.py prepare` where '
             'TFDS and CIFAR-10 are, and take gpu_payload/ along')
  q = args.quick
  a_steps, epoch, bench_steps, torch_steps = (20, 6, 20, 20) if q else (3000, EPOCH, 300, 300)
  limit = 600 if q else 150
  work = tempfile.mkdtemp(prefix='gpu_check_')
  install_missing(os.path.join(work, 'site'))
  os.environ['PYTHONPATH'] = os.pathsep.join(
      [os.path.join(work, 'site'), str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])])
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  py = sys.executable

  part('a. versions', 60, [py, '-c', (
      'import jax, flax, optax, sys; d = jax.local_devices()[0]; '
      'print(f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, '
      'optax {optax.__version__}; {jax.device_count()} x {d.device_kind}"); '
      'print("memory_stats:", d.memory_stats())')])
  part('a. nvidia-smi', 30, ['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                             '--format=csv,noheader'])

  def train(config, workdir, steps, *extra):
    return [py, 'run.py', '--config', f'configs/{config}.py', '--workdir', workdir,
            f'--config.dataset={args.dataset}', f'--config.num_train_steps={steps}',
            '--config.progress=lines', *extra]
  keep = ('devices:', 'input:', 'kernels:', 'data:', 'precision', 'step 0,', 'error')
  a_dir = os.path.join(work, 'a')
  part(f'b. main job: Recipe A, {a_steps:,} steps, real loop, arrays file', limit + 60,
       train('cifar_lrn', a_dir, a_steps), keep)
  real = steps_median(a_dir, "Recipe A's schedule", 3000)

  def bench(name, runs, limit):
    part(name, limit, [py, '-c', BENCH, str(bench_steps), json.dumps(runs)],
         ('bench:', 'Forward-backward across'))
  bench(BENCH_A,
        [('cifar_lrn', b, k) for b in (128, 1024) for k in (1, 10)], limit)
  synthetic = bench_ms(OUTPUT.get(BENCH_A, ''), 'cifar_lrn', 128, 10)
  if real and synthetic:
    print(f'real data vs bench mode, Recipe A, batch 128, K = 10: {real * 1e3:.3f} vs '
          f'{synthetic:.3f} ms/step: {synthetic / (real * 1e3):.1%} of bench throughput '
          '(target >= 95%)', flush=True)
  if has('torch'):
    part(TORCH_A, limit,
         [py, 'benchmarks/torch_recipe_a.py', '--batch', '128', '--steps', str(torch_steps)],
         ('torch',))
    best = torch_best(OUTPUT.get(TORCH_A, ''))
    if best and synthetic:
      ours = 128 / (synthetic / 1e3)
      print(f'cnnjax vs PyTorch\'s best ({best[0]}), Recipe A, batch 128: {ours:,.0f} vs '
            f'{best[1]:,.0f} examples/sec: {ours / best[1]:.2f}x (target >= 2x)', flush=True)
  else:
    print('=== d. PyTorch: not installed here, skipped', flush=True)
  g_steps = 20 if q else 476  # Recipe G's num_train_steps
  g_dir = os.path.join(work, 'g')
  part(f'd2. Recipe G, {g_steps} steps of 1,024, real loop, arrays file', limit,
       train('cifar_fast', g_dir, g_steps, '--config.checkpoint_every=0'), keep)
  steps_median(g_dir, "Recipe G's run", 476)
  if has('torch'):
    per_epoch = 16384 // 1024  # the arrays file's train split
    part('d2. PyTorch Recipe G, compiled, float16, same steps', limit,
         [py, 'benchmarks/torch_recipe_g.py', '--dataset', args.dataset, '--seeds', '0',
          '--compile', '--half', '--epochs', str(g_steps / per_epoch)], ('torch', 'seed'))
  bench('e. bench mode, B to F, batch 128, K = 1 and 10',
        [(c, 128, k) for c in ('cifar_cookbook', 'cifar_tutorial', 'mnist_cnn', 'cifar_deep',
                               'cifar_vgg16') for k in (1, 10)], 2 * limit)
  for config, (what, steps) in FULL.items():
    workdir = os.path.join(work, config)
    part(f'f. one epoch ({epoch} steps) of {config}, real loop', limit,
         train(config, workdir, epoch, '--config.eval_every=0', '--config.checkpoint_every=0',
               *(['--config.log_every=1'] if q else [])),  # --quick: enough steps for a median
         keep)
    steps_median(workdir, f'its {what}', steps)
  part('g. what a checkpoint costs the loop, Recipe A', limit,
       [py, 'benchmarks/checkpoint_cost.py', '--groups', '6' if q else '40',
        '--dataset', args.dataset], ('save() returns',))


if __name__ == '__main__':
  main()
