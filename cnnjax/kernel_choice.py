"""Which implementation an op runs on the CPU: oneDNN's kernel or XLA's formulation.

Decided per op and shape (the shape one device sees), the first time a jitted function
using it is traced, in this order:

1. oneDNN's implementation of any of the op's primitives is a reference one (its
   name starts with 'ref': oneDNN's plain C++ loops, e.g. LRN on AVX2): XLA's.
2. CNNJAX_CPU_KERNELS=onednn: oneDNN's (no measurement).
3. auto (the default): whichever of the two ran the op's forward and backward faster
   on this machine, measured once and kept in a cache file keyed by the machine (CPU
   model, cores, oneDNN's ISA and version, XLA's ISA cap, jaxlib), where the next run
   on the same kind of machine finds it: CNNJAX_KERNEL_CACHE, else
   $XDG_CACHE_HOME/cnnjax/kernel_choices.json (~/.cache/...). A run's own record of its
   choices (recorded_in: the workdir's) comes first: a resume computes as the run did on
   any machine of the same kind, one with an empty cache too (a near tie may time either way).

In a multi-process run process 0 decides and tells the others, so that every process
computes the same arithmetic. The decisions made are listed by kernels.describe().
"""
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

PATHS = ('onednn', 'xla')
ROUNDS = 5  # timed calls of each path, alternating, after two untimed ones


@dataclasses.dataclass(frozen=True)
class Decision:
  op: str  # what runs: 'conv2d 64x24x24x3 * 5x5x3x64, stride 1, pads 2,2,2,2, relu'
  path: str  # 'onednn' | 'xla'
  why: str  # how it was decided, with the times where measured
  impls: tuple  # oneDNN's implementations of the op's primitives, forward first
  entry: dict = None  # a measured choice: as cached (path, both times, when measured)

  def line(self):
    return (f'{self.op}: {"oneDNN" if self.path == "onednn" else "XLA"}, {self.why} '
            f'[oneDNN: {", ".join(self.impls)}]')


_made = {}  # (mode, machine, op) -> Decision, in the order made, for this process
# Measurements and broadcasts run in a thread of their own: a jitted function is being
# traced when a decision is needed, and a computation cannot run inside that trace.
_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='cnnjax-kernel-choice')
_record = None  # (the Cache of the run's own choices, whether to add to it): recorded_in()
_recorded = set()  # (record path, machine, op) put there by this process


@contextlib.contextmanager
def recorded_in(path, write=True):
  """Measured choices come first from the record at `path` (a run's own, in its workdir),
  then from the cache or a measurement; with `write`, each one this process computes with
  is added to the record (the first stored stays). Process 0's record, in a multi-process run.
  The record has no lock file of its own: its one writer is the run that holds the workdir."""
  global _record
  previous, _record = _record, (Cache(path, locked=False), write)
  try:
    yield
  finally:
    _record = previous


def made(mode):
  """The decisions this process has made in `mode` (CNNJAX_CPU_KERNELS), oldest first."""
  return [d for (m, _, _), d in _made.items() if m == mode]


def decide(op, mode, impls, onednn, xla, shapes, machine):
  """The Decision for `op` (a description of the op and its per-device shapes).

  impls: oneDNN's implementation names for the op's primitives; onednn, xla: the two
  implementations, functions of float32 arrays of `shapes`; machine: the cache key.
  """
  key = (mode, machine, op)
  if key not in _made:
    _made[key] = _decide(op, mode, impls, onednn, xla, shapes, machine)
  decision = _made[key]
  record, write = _record or (None, False)
  if (write and decision.entry is not None and (record.path, machine, op) not in _recorded
      and jax.process_index() == 0):
    record.put(machine, op, decision.entry)  # an unwritable record: the run goes on without
    _recorded.add((record.path, machine, op))
  return decision


def _decide(op, mode, impls, onednn, xla, shapes, machine):
  reference = [name for name in impls if name.startswith('ref')]
  if reference:
    return Decision(op, 'xla', f'as oneDNN has only its reference {reference[0]}', impls)
  if mode == 'onednn':
    return Decision(op, 'onednn', 'as CNNJAX_CPU_KERNELS=onednn', impls)
  choose = _agreed if jax.process_count() > 1 else _measured_or_cached
  return _worker.submit(choose, op, impls, onednn, xla, shapes, machine).result()


def _agreed(op, impls, onednn, xla, shapes, machine):
  """Process 0's decision, on every process (each asks in the same order: same program)."""
  from jax.experimental import multihost_utils
  mine = (_measured_or_cached(op, impls, onednn, xla, shapes, machine)
          if jax.process_index() == 0 else None)
  code = multihost_utils.broadcast_one_to_all(np.int32(PATHS.index(mine.path) if mine else 0))
  return mine or Decision(op, PATHS[int(code)], 'as process 0 decided', impls)


def _measured_or_cached(op, impls, onednn, xla, shapes, machine):
  cache, (record, _) = Cache(cache_path()), _record or (None, False)
  recorded = record.get(machine, op) if record else None
  entry = recorded or cache.get(machine, op)
  if recorded:
    how = f"the run's own, measured {entry['measured']}"
  elif entry is None:
    times = _measure(onednn, xla, shapes)
    mine = {'path': 'onednn' if times['onednn'] <= times['xla'] else 'xla',
            'onednn_ms': round(times['onednn'] * 1e3, 3), 'xla_ms': round(times['xla'] * 1e3, 3),
            'measured': datetime.datetime.now().isoformat(timespec='seconds')}
    stored = cache.put(machine, op, mine)
    how = ('measured now' if stored is mine else
           f'measured now, not cached: {cache.error}' if stored is None else
           f'measured {stored["measured"]} by another run, which stored it first')
    entry = stored or mine
  else:
    how = f'measured {entry["measured"]}'
  return Decision(op, entry['path'], f'forward + backward: oneDNN {entry["onednn_ms"]:.2f} ms, '
                                     f'XLA {entry["xla_ms"]:.2f} ms ({how})', tuple(impls), entry)


def _fwd_bwd(fn):
  """fn's output and the gradient of its sum with respect to every input: what training runs."""
  def both(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(jnp.ones_like(out))
  return jax.jit(both)


def _measure(onednn, xla, shapes):
  """Seconds per forward + backward of each path: the least of ROUNDS alternating calls."""
  device = jax.local_devices(backend='cpu')[0]
  one_device = jax.sharding.Mesh(np.array([device]), ('batch',))
  rng = np.random.default_rng(0)
  with jax.set_mesh(one_device):  # the op as one device runs it, not the run's mesh
    args = [jax.device_put(rng.normal(size=s).astype(np.float32), device) for s in shapes]
    runs = {'onednn': _fwd_bwd(onednn), 'xla': _fwd_bwd(xla)}
    for run in runs.values():
      for _ in range(2):  # compile, then once more warm
        jax.block_until_ready(run(*args))
    times = {path: [] for path in runs}
    for _ in range(ROUNDS):
      for path, run in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times[path].append(time.perf_counter() - start)
  return {path: min(t) for path, t in times.items()}


def cache_path():
  if os.environ.get('CNNJAX_KERNEL_CACHE'):
    return os.environ['CNNJAX_KERNEL_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'cnnjax', 'kernel_choices.json')


def _well_formed(entry):
  """An entry as _measured_or_cached stores it."""
  return (isinstance(entry, dict) and entry.get('path') in PATHS
          and all(isinstance(entry.get(k), (int, float)) for k in ('onednn_ms', 'xla_ms'))
          and isinstance(entry.get('measured'), str))


class Cache:
  """A JSON file {machine key: {op: entry}}; writers merge under a lock (PATH.lock, where
  `locked`: several runs share a cache) and replace the file atomically."""

  def __init__(self, path, locked=True):
    self.path, self.locked, self.error = path, locked, None

  def _read(self):
    try:
      with open(self.path) as f:
        data = json.load(f)
      return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
      return {}  # absent, unreadable or torn: measure again

  @staticmethod
  def _entries(data, machine):
    entries = data.get(machine)
    return entries if isinstance(entries, dict) else {}

  def get(self, machine, op):
    entry = self._entries(self._read(), machine).get(op)
    return entry if _well_formed(entry) else None  # a hand edit, another version: measure

  def put(self, machine, op, entry):
    """The entry the file holds for `op` once this returns: `entry`, stored, or the one another
    process stored while this one measured (the first stored stays, so every run that takes
    its decision from the file, a resumed one too, computes with the same arithmetic as the
    run that measured it); None (with .error) where the file cannot be written."""
    folder = os.path.dirname(os.path.abspath(self.path))
    try:
      os.makedirs(folder, exist_ok=True)
      with self._locked():
        data = self._read()
        entries = data[machine] = self._entries(data, machine)
        if not _well_formed(entries.get(op)):
          entries[op] = entry
        stored = entries[op]
        if stored is entry:
          fd, tmp = tempfile.mkstemp(dir=folder, prefix='.kernel_choices.')
          try:
            with os.fdopen(fd, 'w') as f:
              json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
          except OSError:  # a full disk: no half-written file left beside it
            os.unlink(tmp)
            raise
      return stored
    except OSError as e:
      self.error = f'{self.path}: {e.strerror or e}'
      return None

  @contextlib.contextmanager
  def _locked(self):
    if not self.locked:
      yield
      return
    import fcntl
    with open(self.path + '.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
