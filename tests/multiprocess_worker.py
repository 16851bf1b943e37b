"""One process of a local multi-process run (tests/test_multiprocess.py starts two).

argv: coordinator_address num_processes process_id workdir out.npz [recipe=cifar_fast]
[field=value ...] (Recipe A's small config, or with recipe=cifar_fast the short Recipe G).
Trains through the library and writes the params this process computed (its own
copy, before any checkpoint is read back).
"""
import sys

import jax
import numpy as np


def main(coordinator, num_processes, process_id, workdir, out, *overrides):
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from cnnjax import loop
  from tests import conftest
  config = conftest.small_config()
  if overrides and overrides[0] == 'recipe=cifar_fast':  # the short Recipe G instead
    config, overrides = conftest.short_fast_config(), overrides[1:]
  for item in overrides:
    key, value = item.split('=', 1)
    config[key] = type(config[key])(value)
  result = loop.train_and_evaluate(config, workdir)
  leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(result['state'].params)]
  np.savez(out, *leaves, precision=result['precision'], count=result['count'])


if __name__ == '__main__':
  main(*sys.argv[1:])
