"""Data parallelism: one device mesh, batch sharded, state replicated.

jax.jit over NamedSharding'd arrays (the post-pmap way; pmap is in maintenance
mode and its sharded-device-put helpers are gone in JAX 0.10). The train step is
written for the global batch: XLA inserts the gradient all-reduce, so the same
code runs on 1 device, 8 devices or several hosts.
"""
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from cnnjax.errors import UserError


def make_mesh():
  """A 1-D mesh over every device of every process, axis 'batch', set as the current mesh.

  Setting it (jax.set_mesh) lets the oneDNN custom calls (cnnjax/kernels.py)
  find the mesh when traced and run per device under shard_map.
  """
  mesh = jax.make_mesh((jax.device_count(),), ('batch',), axis_types=(AxisType.Auto,))
  jax.set_mesh(mesh)
  return mesh


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharded(mesh):
  return NamedSharding(mesh, P('batch'))


def check_divisible(name, batch_size, mesh):
  devices = mesh.devices.size
  if batch_size % devices:
    raise UserError(f'{name}={batch_size} does not divide evenly across {devices} devices; '
                    f'use a multiple of {devices}')


def put_batch(batch, sharding):
  """This process's slice of the global batch -> one global jax.Array per field."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
