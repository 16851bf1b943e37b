"""What a checkpoint costs the train loop: Recipe A's real trainer and checkpoints, a group
of K steps after a save against a group after none, alternating.

    python benchmarks/checkpoint_cost.py [--groups 40] [--dataset FILE.npz]

Saves are asynchronous (orbax): `Checkpoints.save` hands the state over and returns while
a thread writes it, so the loop pays the handover (the call's own time) and whatever the
writing takes from the next steps (the CPU it shares, on a GPU the copy off the device).
Here every group of `steps_per_dispatch` steps is waited for, a save follows every other
group, and the groups after a save are compared with the groups after none: one process,
so both kinds share the machine's drift. Results: docs/RESULTS.md.
"""
import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow only reads the TFDS files
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from cnnjax import cpu  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--groups', type=int, default=40)
  parser.add_argument('--dataset', default='', help="config.dataset (default: the config's)")
  args = parser.parse_args()
  import jax
  from cnnjax import checkpoint, config as config_lib, loop
  print(cpu.describe(), flush=True)
  config = config_lib.load_file(ROOT / 'configs' / 'cifar_lrn.py')
  if args.dataset:
    config.dataset = args.dataset
  trainer = loop.Trainer(config)
  state, k = trainer.state, config.steps_per_dispatch
  with tempfile.TemporaryDirectory() as work:
    ckpt = checkpoint.Checkpoints(work, 2)
    after = {True: [], False: []}
    calls, saved, step = [], False, 0
    for group in range(args.groups + 2):
      start = time.perf_counter()
      state, metrics = trainer.train(state, step, step + k)
      jax.block_until_ready(metrics)
      if group >= 2:  # compilation and warm-up left out
        after[saved].append(time.perf_counter() - start)
      step += k
      saved = group % 2 == 0
      if saved:
        start = time.perf_counter()
        ckpt.save(step, state)
        calls.append(time.perf_counter() - start)
    ckpt.wait()
    size = sum(f.stat().st_size for f in pathlib.Path(work, 'checkpoints').rglob('*')
               if f.is_file()) / 2
    ckpt.close()
  call, a, o = (statistics.median(x) for x in (calls, after[True], after[False]))
  cost = call + a - o
  print(f'{jax.devices()[0].device_kind}, Recipe A, {k} steps a group, state {size / 2**20:.1f} '
        f'MiB on disk: save() returns in {call * 1e3:.1f} ms (median of {len(calls)}); a group '
        f'after a save {a * 1e3:.1f} ms, after none {o * 1e3:.1f} ms (medians of '
        f'{len(after[True])} and {len(after[False])}): {cost * 1e3:+.1f} ms a save, '
        f'{cost / (o / k * config.checkpoint_every):+.1%} of the steps\' time at the '
        f"config's save every {config.checkpoint_every} steps")


if __name__ == '__main__':
  main()
