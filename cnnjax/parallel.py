"""Data parallelism: one device mesh, batch sharded, state replicated.

jax.jit over NamedSharding'd arrays (the post-pmap way; pmap is in maintenance
mode and its sharded-device-put helpers are gone in JAX 0.10). The train step is
written for the global batch: XLA inserts the gradient all-reduce, so the same
code runs on 1 device, 8 devices or several hosts.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(devices=None):
  """A 1-D mesh over every device of every process (or over `devices`), axis 'batch'. It
  is not set for the process: each jitted function that needs it carries it (scoped)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ('batch',), axis_types=(AxisType.Auto,),
                       devices=devices)


def process_count(mesh):
  """The processes whose devices `mesh` spans."""
  return len({d.process_index for d in mesh.devices.flat})


def scoped(mesh, fn):
  """fn, traced with `mesh` as the context mesh: the oneDNN custom calls
  (cnnjax/kernels.py) find it there when traced and run per device under shard_map.
  Jitted, the mesh is part of the function, whatever mesh (if any) the caller has set."""
  @functools.wraps(fn)
  def within_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return within_mesh


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharded(mesh):
  return NamedSharding(mesh, P('batch'))


def put_batch(batch, sharding):
  """This process's slice of the global batch -> one global jax.Array per field."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


class AnyProcess:
  """Whether any process has raised a flag, answered alike on every process at the same step.

  Each call sends this process's flag through a one-element-per-device all-reduce
  (dispatched behind the step already queued) and returns the previous call's answer,
  which is finished by then: every process reads the same value at the same step, and
  the device queue never waits on the host. A flag raised at step s is answered at s + 1.
  With one process the flag itself is the answer, at once.
  """

  def __init__(self, mesh):
    self._sharding = batch_sharded(mesh)
    self._any = jax.jit(jnp.any, out_shardings=replicated(mesh))
    self._pending = None

  def __call__(self, flag):
    if jax.process_count() == 1:
      return bool(flag)
    local = np.full(jax.local_device_count(), bool(flag))
    previous = self._pending
    self._pending = self._any(jax.make_array_from_process_local_data(self._sharding, local))
    return previous is not None and bool(previous)
