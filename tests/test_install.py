"""The install's promises: the GPU extras pull the jax that the CPU install pins."""
import importlib.metadata
import tomllib

from packaging.requirements import Requirement

from tests.conftest import ROOT

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
