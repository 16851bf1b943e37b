"""Builds cnnjax's oneDNN extension (cnnjax/csrc/onednn_ffi.cc) at install time.

Headers: XLA's FFI API from jaxlib (jax.ffi.include_dir()) and oneDNN's from the
onednn-devel-cpu-gomp wheel, both build requirements in pyproject.toml; the
library (libdnnl.so.3, GNU OpenMP) is the runtime dependency onednn-cpu-gomp.
The extension is optional: where it cannot be built, the install still
succeeds and cnnjax runs on XLA's own kernels (it says so in one line at start).
"""
import importlib.metadata
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _installed_file(distribution, name):
  """The path of the file installed by `distribution` whose path ends with `name`, or None."""
  try:
    files = importlib.metadata.files(distribution) or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if str(f).replace(os.sep, '/').endswith(name):
      return os.path.abspath(f.locate())
  return None


class BuildOneDnn(build_ext):
  def build_extension(self, ext):
    try:
      import jax.ffi
      xla_include = jax.ffi.include_dir()
    except ImportError as e:
      print(f'cnnjax: not building the oneDNN extension (no jax.ffi headers: {e})')
      return
    header = _installed_file('onednn-devel-cpu-gomp', 'include/oneapi/dnnl/dnnl.hpp')
    library = _installed_file('onednn-cpu-gomp', '/libdnnl.so.3')
    if header is None or library is None:
      print('cnnjax: not building the oneDNN extension (onednn-devel-cpu-gomp not installed)')
      return
    # -isystem: the two libraries' headers are theirs; -Wall reports warnings in ours only.
    for include in (xla_include, os.path.dirname(os.path.dirname(os.path.dirname(header)))):
      ext.extra_compile_args += ['-isystem', include]
    ext.extra_link_args += [f'-L{os.path.dirname(library)}', '-l:libdnnl.so.3']
    super().build_extension(ext)


setup(
    ext_modules=[Extension(
        'cnnjax._onednn', sources=['cnnjax/csrc/onednn_ffi.cc'], language='c++',
        extra_compile_args=['-std=c++17', '-O2', '-fvisibility=hidden', '-Wall'],
        optional=True)],
    cmdclass={'build_ext': BuildOneDnn},
)
