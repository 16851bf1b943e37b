"""cnnjax's train step beside TensorFlow's for the same recipe, timed side by side.

    python benchmarks/cpu_vs_tf.py [--recipes A,B,C,D,E,F] [--steps 30] [--rounds 5]
        [--isa avx2] [--steps_per_dispatch 1]

For each recipe: cnnjax's real jitted train steps (cnnjax.bench.Synthetic: the
recipe's config, augmentation, loss, weight losses, optimizer, EMA) and the TF
port of the same step (benchmarks/tf_reference.py, graph mode, TensorFlow's
default oneDNN kernels) on the same synthetic uint8 batch (seeded alike). Each runs
in a process of its own, as its users run it (benchmarks/side_by_side.py: cnnjax with
its malloc setting, TensorFlow without it). After warm-up the two alternate: `rounds`
times, `steps` steps of one, then `steps` of the other, each run waited for at its end.
cnnjax runs --steps_per_dispatch steps per dispatch (default 1, as TF's one step a call;
the config's own is 10). Prints the CPU and its ISA caps, per-round times, the median
examples/sec of each, the ratio cnnjax / TF (above 1: cnnjax is faster), each side's
GFLOP/s and its fraction of this machine's float32 matmul limit (benchmarks/flops.py),
and the kernels cnnjax chose. Results and the command: docs/RESULTS.md.
"""
import argparse
import os
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]

from cnnjax import cpu  # noqa: E402

cpu.cap_isa_from_argv(sys.argv)  # before jax and TensorFlow load oneDNN
import side_by_side  # noqa: E402

RECIPES = side_by_side.RECIPES
FEW_STEPS = {'E': 3, 'F': 3}  # the deep nets take seconds per step on two cores


def serve_cnnjax(recipe, steps_per_dispatch):
  import jax
  from cnnjax import bench, config as config_lib, kernels
  import flops
  config = config_lib.load_file(ROOT / 'configs' / f'{RECIPES[recipe]}.py')
  s = bench.Synthetic(config, steps_per_call=steps_per_dispatch)
  s.trace()
  side_by_side.serve(s.train_once, steps_per_dispatch, {
      'batch': s.batch, 'flops_per_example': flops.step_flops(config),
      'kernels': kernels.describe(), 'versions': f'jax {jax.__version__}'})


def serve_tf(recipe):
  os.environ['CNNJAX_KEEP_FREED_MEMORY'] = '0'  # TensorFlow as its users run it
  os.environ['TF_ENABLE_ONEDNN_OPTS'] = '1'  # TF's default on x86 Linux; run.py turns it off
  import tf_reference
  from cnnjax import bench, config as config_lib
  tf = tf_reference.tf
  config = config_lib.load_file(ROOT / 'configs' / f'{RECIPES[recipe]}.py')
  batch, size, channels, classes = bench.input_spec(config)
  host = bench.synthetic_batch(batch, size, channels, classes)  # cnnjax's own batch
  images, labels = tf.constant(host['image']), tf.constant(host['label'])
  step = tf_reference.TrainStep(config, (size, size, channels), classes)
  from tensorflow.python.util import _pywrap_util_port
  side_by_side.serve(lambda: step(images, labels)[0].numpy(), 1, {  # the loss: waits
      'onednn': _pywrap_util_port.IsMklEnabled(), 'versions': f'tensorflow {tf.__version__}'})


def compare(recipe, steps, rounds, steps_per_dispatch, peak):
  here = [__file__, '--recipes', recipe, '--steps_per_dispatch', str(steps_per_dispatch)]
  children = {'cnnjax': side_by_side.Child(here + ['--child', 'cnnjax']),
              'tensorflow': side_by_side.Child(here + ['--child', 'tensorflow'])}
  times = side_by_side.alternate(children, steps, rounds)
  for child in children.values():
    child.close()
  ours, theirs = children['cnnjax'].info, children['tensorflow'].info
  batch = ours['batch']
  med = {k: statistics.median(v) for k, v in times.items()}
  gflops = {k: batch * ours['flops_per_example'] / t / 1e9 for k, t in med.items()}
  row = {'recipe': recipe, 'config': RECIPES[recipe], 'batch': batch,
         'cnnjax_ms': med['cnnjax'] * 1e3, 'tf_ms': med['tensorflow'] * 1e3,
         'cnnjax_eps': batch / med['cnnjax'], 'tf_eps': batch / med['tensorflow'],
         'ratio': med['tensorflow'] / med['cnnjax'], 'gflops': gflops,
         'rounds_ms': {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
         'kernels': ours['kernels'], 'versions': f'{ours["versions"]}, {theirs["versions"]} '
                                                  f'(oneDNN {"on" if theirs["onednn"] else "off"})'}
  print(f"{recipe} {row['config']:15s} batch {batch:3d}: cnnjax {row['cnnjax_ms']:7.1f} ms "
        f"({row['cnnjax_eps']:6.0f} ex/s, {gflops['cnnjax']:.0f} GFLOP/s = "
        f"{gflops['cnnjax'] / peak:.0%} of the limit)  TF {row['tf_ms']:7.1f} ms "
        f"({row['tf_eps']:6.0f} ex/s, {gflops['tensorflow'] / peak:.0%})  "
        f"ratio {row['ratio']:.2f}x   rounds {row['rounds_ms']}", flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--recipes', default='A,B,C,D,E,F')
  parser.add_argument('--steps_per_dispatch', type=int, default=1,
                      help="cnnjax's train steps per dispatch (the configs' default: 10)")
  side_by_side.add_arguments(parser, 30, 5, ['cnnjax', 'tensorflow'],
                             steps_help='steps per timed run (E, F: 3)')
  args = parser.parse_args()
  if args.child == 'cnnjax':
    return serve_cnnjax(args.recipes, args.steps_per_dispatch)
  if args.child == 'tensorflow':
    return serve_tf(args.recipes)
  import flops
  print(cpu.describe(), flush=True)
  peak = max(flops.matmul_peak().values())
  print(f'float32 matmul limit (benchmarks/flops.py): {peak:.0f} GFLOP/s', flush=True)
  rows = []
  for recipe in args.recipes.split(','):
    steps = min(args.steps, FEW_STEPS.get(recipe, args.steps))
    steps = max(steps, args.steps_per_dispatch)
    rows.append(compare(recipe, steps, args.rounds, args.steps_per_dispatch, peak))
  print(f'\n{rows[0]["versions"]}; cnnjax: {args.steps_per_dispatch} step(s) per dispatch')
  print('\n| recipe | batch | cnnjax ms/step | TF ms/step | cnnjax ex/s | TF ex/s | cnnjax / TF '
        '| cnnjax GFLOP/s (of the limit) | TF GFLOP/s (of the limit) |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['recipe']} `{r['config']}` | {r['batch']} | {r['cnnjax_ms']:.1f} | "
          f"{r['tf_ms']:.1f} | {r['cnnjax_eps']:,.0f} | {r['tf_eps']:,.0f} | "
          f"**{r['ratio']:.2f}x** | {r['gflops']['cnnjax']:.0f} ({r['gflops']['cnnjax'] / peak:.0%}) "
          f"| {r['gflops']['tensorflow']:.0f} ({r['gflops']['tensorflow'] / peak:.0%}) |")
  print('\ncnnjax CPU kernels (per recipe, as chosen in its process):')
  for r in rows:
    print(f'{r["recipe"]}: {r["kernels"]}')


if __name__ == '__main__':
  main()
