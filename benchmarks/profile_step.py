"""Where a recipe's train step spends its time on this machine: a jax.profiler trace, per op.

    CNNJAX_CPU_KERNELS=auto|xla python benchmarks/profile_step.py [--config configs/cifar_lrn.py]
        [--isa avx2]

Runs the real jitted train step (cnnjax.bench.Synthetic) `--steps` times under
jax.profiler.trace, reads the Perfetto trace it writes, and prints every XLA
thunk (fusion, custom call, dot, ...) with its mean milliseconds per step, what
it computes (from the compiled HLO: its operation and the JAX source op it came
from) and the wall time per step. Thunks may overlap on the CPU's threads, so the
rows can add up to more than the wall time. Results: docs/RESULTS.md.
"""
import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnjax import cpu  # noqa: E402

cpu.cap_isa_from_argv(sys.argv)  # before jax loads XLA and oneDNN
import jax  # noqa: E402

from cnnjax import bench, config as config_lib, kernels  # noqa: E402


INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)$')


def describe_instructions(hlo_text):
  """instruction name -> 'opcode [custom call target / fused ops] shape  (JAX op)'."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif current is not None and INSTRUCTION.match(line):
      current.append(line)
  described = {}
  for lines in computations.values():
    for line in lines:
      name, shape, opcode, rest = INSTRUCTION.match(line).groups()
      what = opcode
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      called = re.search(r'calls=%?([\w.\-]+)', rest)
      if target:
        what = f'custom-call {target.group(1)}'
      elif called and called.group(1) in computations:
        ops = sorted({INSTRUCTION.match(l).group(3) for l in computations[called.group(1)]}
                     - {'parameter', 'constant', 'bitcast', 'broadcast', 'tuple',
                        'get-tuple-element'})
        what = f'{opcode}[{",".join(ops)[:60]}]'
      op_name = re.search(r'op_name="([^"]+)"', rest)
      source = op_name.group(1).split('/')[-1] if op_name else ''
      described[name] = f'{what} {shape[:40]}  ({source[:50]})'
  return described


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=str(ROOT / 'configs' / 'cifar_lrn.py'))
  parser.add_argument('--steps', type=int, default=10, help='dispatches traced')
  parser.add_argument('--steps_per_dispatch', type=int, default=1,
                      help='train steps per dispatch (one lax.scan); times are per step')
  parser.add_argument('--top', type=int, default=40)
  parser.add_argument('--isa', choices=list(cpu.ISA_CAPS), default='native',
                      help='cap oneDNN and XLA (and TF) at this ISA (cnnjax/cpu.py)')
  args = parser.parse_args()
  print(cpu.describe(), flush=True)
  s = bench.Synthetic(config_lib.load_file(args.config), steps_per_call=args.steps_per_dispatch)
  per_step = args.steps * args.steps_per_dispatch
  described = describe_instructions(s.compiled_text())
  for _ in range(5):
    s.train_once()
  jax.block_until_ready(s.train_once())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(args.steps):
        out = s.train_once()
      jax.block_until_ready(out)
      wall = (time.perf_counter() - start) / per_step
    path = glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  total = collections.defaultdict(float)
  for e in events:
    if e.get('ph') == 'X' and e['name'] in described:
      total[e['name']] += e['dur'] / 1e3 / per_step
  print(f'{args.config}: batch {s.batch}, {args.steps_per_dispatch} step(s) per dispatch, '
        f'CPU kernels: {kernels.describe()}')
  print(f'wall time per step: {wall * 1e3:.1f} ms; sum of thunks: {sum(total.values()):.1f} ms '
        f'over {len(total)} thunks')
  print('| ms/step | thunk | what (JAX op) |\n|---|---|---|')
  rows = sorted(total.items(), key=lambda kv: -kv[1])
  for name, ms in rows[:args.top]:
    print(f'| {ms:.2f} | {name} | {described[name]} |')
  rest = sum(ms for _, ms in rows[args.top:])
  print(f'| {rest:.2f} | ({len(rows) - args.top} more thunks) | |')


if __name__ == '__main__':
  main()
