"""The install's promises: the GPU extras pull the jax that the CPU install pins."""
import importlib.metadata
import tomllib

from packaging.requirements import Requirement

from tests.conftest import ROOT, run_code

GPU_EXTRAS = {'cuda': 'cuda12', 'cuda13': 'cuda13'}  # cnnjax's extra -> jax's


def test_gpu_extras_pin_the_same_jax_as_the_cpu_install_and_jax_offers_them():
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  pinned = [r for r in map(Requirement, project['dependencies']) if r.name == 'jax']
  assert len(pinned) == 1
  installed = importlib.metadata.version('jax')
  assert pinned[0].specifier.contains(installed)
  jax_requires = [Requirement(r) for r in importlib.metadata.requires('jax')]
  for extra, jax_extra in GPU_EXTRAS.items():
    (req,) = map(Requirement, project['optional-dependencies'][extra])
    assert req.name == 'jax' and req.extras == {jax_extra}
    assert req.specifier == pinned[0].specifier
    # The installed jax has that extra, and it brings a CUDA plugin of its own version.
    plugins = [r for r in jax_requires
               if r.marker and r.marker.evaluate({'extra': jax_extra}) and 'plugin' in r.name]
    assert plugins and all(r.specifier.contains(installed) for r in plugins), plugins


def test_the_extension_builds_against_the_jax_range_it_runs_with_and_flax_follows_python():
  toml = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  deps = [Requirement(r) for r in toml['project']['dependencies']]
  (run_jax,) = [r for r in deps if r.name == 'jax']
  (build_jax,) = [Requirement(r) for r in toml['build-system']['requires']
                  if Requirement(r).name == 'jax']
  assert build_jax.specifier == run_jax.specifier
  # The requirements that apply to this Python hold for what is installed (flax's differ
  # by Python: 0.12.9+ need 3.12 and jax 0.11.1; 0.12.8's nnx breaks on jax 0.11).
  for r in deps:
    if (r.marker is None or r.marker.evaluate()) and r.name in ('jax', 'flax', 'optax',
                                                                'orbax-checkpoint'):
      assert r.specifier.contains(importlib.metadata.version(r.name)), r
  flax = {str(r.marker): r.specifier for r in deps if r.name == 'flax'}
  assert sorted(flax) == ['python_version < "3.12"', 'python_version >= "3.12"']
  assert not flax['python_version >= "3.12"'].contains('0.12.8')


def test_loading_a_config_imports_no_jax():
  # Config files are read by scripts and tools that need no accelerator stack.
  code = ('import sys; from cnnjax import config; c = config.load_file("configs/cifar_lrn.py"); '
          'print(c.model, sorted(m for m in ("jax", "flax", "optax") if m in sys.modules))')
  result = run_code(code, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['cifar_lrn', '[]']
