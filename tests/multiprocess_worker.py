"""One process of a local multi-process run (tests/test_multiprocess.py starts two).

argv: coordinator_address num_processes process_id workdir out.npz [field=value ...]
Trains through the library, then restores the final checkpoint on the multi-process
mesh and writes this process's own copy of the params.
"""
import sys

import jax
import numpy as np


def main(coordinator, num_processes, process_id, workdir, out, *overrides):
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from cnnjax import checkpoint, loop
  from tests.conftest import small_config
  config = small_config()
  for item in overrides:
    key, value = item.split('=', 1)
    config[key] = type(config[key])(value)
  result = loop.train_and_evaluate(config, workdir)
  trainer = loop.Trainer(config, for_training=False)
  ckpt = checkpoint.Checkpoints(workdir, 3)
  state = ckpt.restore(result['step'], trainer.state)
  ckpt.close()
  leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
  np.savez(out, *leaves, precision=result['precision'], count=result['count'])


if __name__ == '__main__':
  main(*sys.argv[1:])
