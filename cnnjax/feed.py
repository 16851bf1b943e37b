"""How each group of train steps gets its batches onto the devices.

Two feeds, one batch order: both read the rows data.TrainShards.rows(seed, step)
names, so a run trains on the same batches, bit for bit, whichever feeds it.

- HostFeed: the host gathers each step's uint8 batch from the split in memory and
  puts a group's batches on the devices while the previous group runs.
- DeviceFeed: the uint8 split goes to the devices once, each device holding the
  shards its rows of every batch come from; per group only the row numbers travel
  (4 bytes an example), and each device gathers its own rows inside the jitted step.

Each feed has `inputs(start, end)`: the device arrays the steps start..end-1 need,
stacked on a leading step axis; `data`: what stays on the devices (None on the host
path); and `fetch(data, x)`: the pure function that turns one step's input into its
global batch inside the jitted train steps (train.train_steps).
"""
import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cnnjax import parallel

# data_on_device='auto' puts the split on the devices when each device's part takes at
# most this fraction of its memory (the rest is the model's, activations' and XLA's).
DEVICE_MEMORY_FRACTION = 0.25
SETTINGS = ('auto', 'true', 'false')


def steps_sharding(mesh):
  """A stack of per-step inputs: steps unsharded, each step's batch split over devices."""
  return NamedSharding(mesh, P(None, 'batch'))


class HostFeed:
  data = None

  def __init__(self, shards, seed, mesh):
    self.shards, self.seed = shards, seed
    self.sharding = steps_sharding(mesh)

  def inputs(self, start, end):
    batches = [self.shards.batch(self.seed, step) for step in range(start, end)]
    return parallel.put_batch({k: np.stack([b[k] for b in batches]) for k in batches[0]},
                              self.sharding)

  @staticmethod
  def fetch(data, batch):
    del data
    return batch


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where this process's shards sit on its devices.

  Local device j holds, one after another, the shards its rows of every local batch
  come from (its own shards when the shards are a multiple of the devices; a whole
  shard, shared with its neighbours, when the devices are). `row_offset[j, r]` is
  where the shard of device j's r-th row starts in j's block; `block` the longest
  block, to which the others are padded.
  """
  shards_of_device: tuple  # per local device, the local shard indices it holds
  row_offset: np.ndarray  # int32, local devices x rows per device
  block: int

  @classmethod
  def of(cls, shards, local_devices):
    rows = shards.shard_batch * len(shards.shards)  # this process's rows of a batch
    per_device = rows // local_devices
    shard_of_row = np.arange(rows) // shards.shard_batch
    held, offsets = [], []
    for j in range(local_devices):
      mine = shard_of_row[j * per_device:(j + 1) * per_device]
      needed = tuple(range(mine[0], mine[-1] + 1))
      start = dict(zip(needed, np.cumsum([0] + [len(shards.shards[i]) for i in needed])))
      held.append(needed)
      offsets.append([start[i] for i in mine])
    block = max(sum(len(shards.shards[i]) for i in needed) for needed in held)
    return cls(tuple(held), np.asarray(offsets, np.int32), int(block))

  def bytes_per_device(self, shards):
    example = shards.shards[0].images[0].nbytes + shards.shards[0].labels[0].nbytes
    return self.block * example


class DeviceFeed:

  def __init__(self, shards, seed, mesh, layout):
    self.shards, self.seed, self.layout = shards, seed, layout
    self.sharding = steps_sharding(mesh)
    first = shards.shards[0]
    local = len(layout.shards_of_device)
    images = np.zeros((local, layout.block, *first.images.shape[1:]), np.uint8)
    labels = np.zeros((local, layout.block), np.int32)
    index = np.zeros((local, layout.block), np.int32)
    for j, held in enumerate(layout.shards_of_device):
      for block, part in ((images, [shards.shards[i].images for i in held]),
                          (labels, [shards.shards[i].labels for i in held]),
                          (index, [shards.index([np.arange(len(shards.shards[i]))], [i])
                                   for i in held])):
        part = np.concatenate(part)
        block[j, :len(part)] = part
    per_device = parallel.batch_sharded(mesh)
    self.data = {k: jax.make_array_from_process_local_data(per_device, v)
                 for k, v in (('image', images), ('label', labels), ('index', index))}

  def inputs(self, start, end):
    """Each step's rows as positions in each device's block: steps x local devices x rows."""
    local, per_device = self.layout.row_offset.shape
    rows = np.stack([np.concatenate(self.shards.rows(self.seed, step)).reshape(local, per_device)
                     for step in range(start, end)])
    return jax.make_array_from_process_local_data(
        self.sharding, (rows + self.layout.row_offset).astype(np.int32))

  @staticmethod
  def fetch(data, rows):
    """The global batch of one step, each device gathering its rows from its own block."""
    def gather(data, rows):  # one device's block and rows: leading axis of 1
      return {k: v[0][rows[0]] for k, v in data.items()}
    return jax.shard_map(gather, in_specs=(P('batch'), P('batch')), out_specs=P('batch'))(
        data, rows)


def _device_memory():
  """The smallest local device memory limit in bytes (PJRT's `bytes_limit`, which GPUs
  report), or None where a device reports none: the CPU (memory_stats() is None; there the
  host's memory is the device's, nothing to gain), or a plugin's unset field (-1)."""
  limits = [(d.memory_stats() or {}).get('bytes_limit', -1) for d in jax.local_devices()]
  return None if min(limits) <= 0 else min(limits)


def make(setting, shards, seed, mesh):
  """The feed config.data_on_device asks for ('auto' | 'true' | 'false'), with a
  `description` of which and why."""
  layout = Layout.of(shards, jax.local_device_count())
  need = layout.bytes_per_device(shards)
  if setting == 'auto':
    memory = _device_memory()
    on = memory is not None and need <= DEVICE_MEMORY_FRACTION * memory
    why = (f'data_on_device=auto: {need / 2**20:,.0f} MiB per device'
           + (' and the device reports no memory size' if memory is None else
              f' {"within" if on else "over"} {DEVICE_MEMORY_FRACTION:.0%} of '
              f'{memory / 2**30:,.1f} GiB'))
  else:
    on, why = setting == 'true', f'data_on_device={setting}'
  if on:
    chosen = DeviceFeed(shards, seed, mesh, layout)
    chosen.description = (f'the train split on the devices ({need / 2**20:,.0f} MiB each), '
                          f'batches gathered there ({why})')
  else:
    chosen = HostFeed(shards, seed, mesh)
    chosen.description = f'batches gathered on the host, sent one dispatch ahead ({why})'
  return chosen
