"""End-to-end training throughput on the real TFDS data, beside bench mode's synthetic figure.

    python benchmarks/end_to_end.py [--config configs/cifar_lrn.py] [--batch 128]
        [--steps_per_dispatch 1,10] [--data_on_device false,true] [--steps 600] [--rounds 3]
        [--isa avx2]

For every (steps_per_dispatch, data_on_device) pair, trains the config through the real
loop (loop.train_and_evaluate: the real data, feed, dispatch groups and metric reads;
no evaluation or checkpoint until the end) in a fresh workdir, and takes the median
examples/sec of its log lines after the first (which include compilation). The pairs
run in turn, `rounds` times over, in one process, so they share the machine's state;
then bench mode's synthetic train step (same batch and steps_per_dispatch) as the
ceiling. Prints a markdown table with each figure's ratio to the synthetic one.
"""
import argparse
import itertools
import json
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnjax import cpu  # noqa: E402

cpu.cap_isa_from_argv(sys.argv)  # before jax loads XLA and oneDNN
import jax  # noqa: E402

from cnnjax import bench, config as config_lib, kernels, loop  # noqa: E402


def real_data_rate(config, workdir):
  loop.train_and_evaluate(config, workdir)
  lines = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
  rates = [r['examples_per_sec'] for r in lines if r['kind'] == 'train'][1:]
  return statistics.median(rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=str(ROOT / 'configs' / 'cifar_lrn.py'))
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps_per_dispatch', default='1,10')
  parser.add_argument('--data_on_device', default='false,true')
  parser.add_argument('--steps', type=int, default=600, help='per run; logged every steps/6')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--isa', choices=list(cpu.ISA_CAPS), default='native',
                      help='cap oneDNN and XLA (and TF) at this ISA (cnnjax/cpu.py)')
  args = parser.parse_args()
  print(cpu.describe(), flush=True)
  base = config_lib.load_file(args.config)
  base.update(dict(batch_size=args.batch, num_train_steps=args.steps, eval_every=0,
                   checkpoint_every=0, log_every=args.steps // 6, eval_split='test[:512]',
                   eval_batch_size=args.batch, progress='lines'))
  pairs = list(itertools.product([int(k) for k in args.steps_per_dispatch.split(',')],
                                 args.data_on_device.split(',')))
  print(f'jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'kernels: {kernels.describe()}; {args.config}, batch {args.batch}, {args.steps} steps '
        f'x {args.rounds} rounds', flush=True)
  rates = {pair: [] for pair in pairs}
  for _ in range(args.rounds):
    for k, on_device in pairs:
      config = base.copy_and_resolve_references()
      config.update(dict(steps_per_dispatch=k, data_on_device=on_device))
      with tempfile.TemporaryDirectory() as workdir:
        rates[(k, on_device)].append(real_data_rate(config, workdir))
  synthetic = {}
  for k in sorted({k for k, _ in pairs}):
    config = base.copy_and_resolve_references()
    config.update(dict(steps_per_dispatch=k))
    config.bench.update(dict(steps=max(100, args.steps // 2), burn_in=2 * k))
    s = bench.Synthetic(config)
    synthetic[k] = bench.time_run('Forward-backward', s.train_once, config.bench.burn_in,
                                  config.bench.steps, s.batch, s.steps_per_call)['examples_per_sec']
  print('\n| steps per dispatch | data on device | real data, examples/sec (median of rounds) '
        '| rounds | synthetic (bench), examples/sec | real / synthetic |')
  print('|---|---|---|---|---|---|')
  for (k, on_device), values in rates.items():
    median = statistics.median(values)
    print(f'| {k} | {on_device} | {median:,.0f} | {", ".join(f"{v:,.0f}" for v in values)} | '
          f'{synthetic[k]:,.0f} | {median / synthetic[k]:.2f} |')


if __name__ == '__main__':
  main()
