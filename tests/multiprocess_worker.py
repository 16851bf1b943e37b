"""One process of a local multi-process run (tests/test_multiprocess.py starts two).

argv: coordinator_address num_processes process_id workdir out.npz [field=value ...]
Trains through the library and writes the params this process computed (its own
copy, before any checkpoint is read back).
"""
import sys

import jax
import numpy as np


def main(coordinator, num_processes, process_id, workdir, out, *overrides):
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from cnnjax import loop
  from tests.conftest import small_config
  config = small_config()
  for item in overrides:
    key, value = item.split('=', 1)
    config[key] = type(config[key])(value)
  result = loop.train_and_evaluate(config, workdir)
  leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(result['state'].params)]
  np.savez(out, *leaves, precision=result['precision'], count=result['count'])


if __name__ == '__main__':
  main(*sys.argv[1:])
