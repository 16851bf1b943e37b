"""The CPU this process runs on: its model, its vector ISA, and caps that emulate a smaller one.

Kernel speed depends on the instruction set: oneDNN JIT-compiles its kernels for the
widest ISA the CPU has (or ONEDNN_MAX_CPU_ISA allows), and XLA generates code for
the CPU's ISA (or --xla_cpu_max_isa). cap_isa('avx2') sets both, for oneDNN (ours and
TensorFlow's, which reads the same variable) and XLA, so that a machine with AVX-512
measures what an AVX2-only machine runs. It must run before jax, TensorFlow or oneDNN
are loaded: the benchmarks call it first thing. Nothing here imports jax.
"""
import os
import platform

# --isa NAME -> (ONEDNN_MAX_CPU_ISA, --xla_cpu_max_isa); 'native' sets neither.
ISA_CAPS = {'avx2': ('AVX2', 'AVX2'), 'avx512': ('AVX512_CORE', 'AVX512'), 'native': None}


def cap_isa(isa):
  """Caps oneDNN and XLA at `isa` (a key of ISA_CAPS) for this process and its children."""
  if isa not in ISA_CAPS:
    raise ValueError(f'isa must be one of {", ".join(ISA_CAPS)}, got {isa!r}')
  if ISA_CAPS[isa] is None:
    return
  onednn, xla = ISA_CAPS[isa]
  os.environ['ONEDNN_MAX_CPU_ISA'] = onednn
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith('--xla_cpu_max_isa=')]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'--xla_cpu_max_isa={xla}'])


def _cpuinfo():
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def model():
  """'AMD EPYC (family 25, model 17)', or what the platform says where /proc/cpuinfo is absent."""
  info = _cpuinfo()
  name = info.get('model name') or platform.processor() or platform.machine()
  if 'cpu family' in info and 'model' in info:
    name += f' (family {info["cpu family"]}, model {info["model"]})'
  return name


def vector_isa():
  """The widest x86 vector extension the CPU reports: 'avx512', 'avx2', ... or the machine."""
  flags = set(_cpuinfo().get('flags', '').split())
  for isa, flag in (('avx512', 'avx512f'), ('avx2', 'avx2'), ('avx', 'avx'), ('sse4.2', 'sse4_2')):
    if flag in flags:
      return isa
  return platform.machine()


def cores():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count()


def caps():
  """The ISA caps in effect, as 'ONEDNN_MAX_CPU_ISA=AVX2, --xla_cpu_max_isa=AVX2', or 'none'."""
  found = []
  if os.environ.get('ONEDNN_MAX_CPU_ISA'):
    found.append(f'ONEDNN_MAX_CPU_ISA={os.environ["ONEDNN_MAX_CPU_ISA"]}')
  found += [f for f in os.environ.get('XLA_FLAGS', '').split() if f.startswith('--xla_cpu_max_isa=')]
  return ', '.join(found) or 'none'


def describe():
  """One line naming the CPU, its ISA and the caps: printed by every benchmark."""
  return f'CPU: {model()}, {cores()} cores, {vector_isa()}; ISA caps: {caps()}'


def cap_isa_from_argv(argv):
  """Applies `--isa NAME` (or `--isa=NAME`) from a command line, before jax is imported:
  run.py and the benchmarks call it first thing, then parse --isa again for its help."""
  for i, arg in enumerate(argv):
    if arg.startswith('--isa='):
      name = arg.split('=', 1)[1]
    elif arg == '--isa' and i + 1 < len(argv):
      name = argv[i + 1]
    else:
      continue
    if name in ISA_CAPS:  # anything else: the flag parser reports it
      cap_isa(name)


def keep_freed_memory():
  """Makes glibc's malloc keep the memory a computation frees, for the next one to reuse.

  XLA:CPU allocates each dispatch's temporary buffers with malloc and frees them at its
  end. glibc returns large blocks to the system on free (mmap'ed chunks, and the mmap'ed
  heaps of its per-thread arenas), so every dispatch page-faults its way through tens
  of MB of fresh zeroed pages: on Recipe A's step that was 16,000-22,000 page faults
  and ~30 ms per dispatch (docs/RESULTS.md), one step per dispatch 1.3x as slow as ten.
  Here: one arena (the main heap, grown with brk), no mmap'ed chunks, no trimming, so
  freed buffers are reused in place, as TensorFlow's allocator reuses its own. The
  cost: the process keeps its peak heap. Linux with glibc only (elsewhere, or with
  CNNJAX_KEEP_FREED_MEMORY=0, a no-op). Returns whether it applied.
  """
  if (os.environ.get('CNNJAX_KEEP_FREED_MEMORY', '1') == '0' or platform.system() != 'Linux'
      or platform.libc_ver()[0] != 'glibc'):
    return False
  import ctypes
  libc = ctypes.CDLL('libc.so.6')
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # malloc.h
  return all(libc.mallopt(option, value) for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))
