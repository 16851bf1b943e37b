"""Which path each op takes on the CPU (cnnjax/kernel_choice.py), and XLA's path in a loop.

The choice: a reference oneDNN implementation always falls back to XLA's; otherwise
the faster of the two as measured, cached per machine; an ISA cap changes both the
implementations and the cache key. XLA's own path: every convolution of the compiled
train steps, inside their lax.scan included, in the canonical form XLA:CPU runs fast.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import bench, cpu, kernel_choice, kernels, ops
from tests.conftest import ROOT, child_env, recipe_config, run_code, small_config, unset_env

MACHINE = 'test machine'


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """An empty cache file and no decisions made yet in this process."""
  monkeypatch.setenv('CNNJAX_KERNEL_CACHE', str(tmp_path / 'choices.json'))
  monkeypatch.setattr(kernel_choice, '_made', {})
  return tmp_path / 'choices.json'


def never_called(*args):
  raise AssertionError('this implementation should not have been run')


def slow(x):
  """A correct but slower 'implementation': the same sum, after 200 matrix products."""
  for _ in range(200):
    x = jnp.tanh(x @ x.T) @ x
  return x


def fast(x):
  return x * 2


def decide(op, impls=('jit:avx512_core', 'jit:avx512_core'), mode='auto', onednn=fast,
           xla=slow, machine=MACHINE):
  return kernel_choice.decide(op, mode, list(impls), onednn, xla, [(64, 64)], machine)


def test_a_reference_implementation_takes_xlas_path_unmeasured(fresh):
  for mode in ('auto', 'onednn'):
    d = decide('lrn a', impls=('lrn_jit:avx512_core', 'ref:any'), mode=mode,
               onednn=never_called, xla=never_called)
    assert d.path == 'xla' and 'reference ref:any' in d.why
  assert not fresh.exists()  # nothing measured, nothing cached


def test_onednn_mode_takes_onednn_unmeasured(fresh):
  d = decide('conv a', mode='onednn', onednn=never_called, xla=never_called)
  assert d.path == 'onednn' and 'CNNJAX_CPU_KERNELS=onednn' in d.why


@pytest.mark.parametrize('onednn,xla,expected', [(fast, slow, 'onednn'), (slow, fast, 'xla')])
def test_auto_measures_and_takes_the_faster(fresh, onednn, xla, expected):
  d = decide('op', onednn=onednn, xla=xla)
  assert d.path == expected and 'measured now' in d.why
  entry = json.loads(fresh.read_text())[MACHINE]['op']
  assert entry['path'] == expected
  faster, slower = sorted((entry['onednn_ms'], entry['xla_ms']))
  assert slower > 3 * faster  # 200 products against one multiply


def test_a_decision_is_read_back_from_the_cache_by_the_same_machine_only(fresh, monkeypatch):
  first = decide('op', onednn=slow, xla=fast)
  assert first.path == 'xla'
  monkeypatch.setattr(kernel_choice, '_made', {})  # as a new process would start
  again = decide('op', onednn=never_called, xla=never_called)
  assert again.path == 'xla' and 'measured now' not in again.why
  # Another machine (another CPU, ISA cap or library version) measures for itself.
  other = decide('op', onednn=fast, xla=slow, machine='another machine')
  assert other.path == 'onednn' and 'measured now' in other.why
  assert set(json.loads(fresh.read_text())) == {MACHINE, 'another machine'}


def test_an_op_two_runs_measure_at_once_takes_the_choice_stored_first_in_both(fresh, monkeypatch):
  # Otherwise the run that measured would compute with its own choice while the file, and so
  # a resume of that run, held the other's: the resume would not be bit for bit.
  theirs = {'path': 'xla', 'onednn_ms': 2.0, 'xla_ms': 1.0, 'measured': '2026-12-07T16:00:00'}
  measure = kernel_choice._measure

  def measure_while_another_run_stores(*args):
    times = measure(*args)
    kernel_choice.Cache(str(fresh)).put(MACHINE, 'op', dict(theirs))
    return times
  monkeypatch.setattr(kernel_choice, '_measure', measure_while_another_run_stores)
  d = decide('op', onednn=fast, xla=slow)  # this run measures oneDNN as the faster
  assert d.path == 'xla' and 'by another run' in d.why
  assert json.loads(fresh.read_text())[MACHINE]['op'] == theirs
  monkeypatch.setattr(kernel_choice, '_made', {})  # a resume: a new process
  assert decide('op', onednn=never_called, xla=never_called).path == 'xla'


def test_a_runs_own_record_comes_before_the_cache_and_holds_what_the_run_computed_with(
    fresh, tmp_path, monkeypatch):
  record = tmp_path / 'workdir' / 'kernel_choices.json'
  with kernel_choice.recorded_in(str(record)):
    assert decide('op', onednn=fast, xla=slow).path == 'onednn'  # measured, then stored
  assert json.loads(record.read_text()) == json.loads(fresh.read_text())
  assert os.listdir(record.parent) == [record.name]  # no lock file: the workdir's lock serves
  # A resume on a machine of the same kind whose cache holds the other choice.
  fresh.write_text(json.dumps({MACHINE: {'op': dict(
      json.loads(fresh.read_text())[MACHINE]['op'], path='xla')}}))
  for write in (False, True):  # eval mode reads the record; training also adds to it
    monkeypatch.setattr(kernel_choice, '_made', {})  # a new process
    with kernel_choice.recorded_in(str(record), write=write):
      d = decide('op', onednn=never_called, xla=never_called)
      assert d.path == 'onednn' and "the run's own" in d.why
  monkeypatch.setattr(kernel_choice, '_made', {})
  assert decide('op', onednn=never_called, xla=never_called).path == 'xla'  # no record: cache's
  # A decision this process made before the record was taken up is added to it as made.
  with kernel_choice.recorded_in(str(tmp_path / 'another_run.json')):
    decide('op', onednn=never_called, xla=never_called)
  assert json.loads((tmp_path / 'another_run.json').read_text())[MACHINE]['op']['path'] == 'xla'
  with kernel_choice.recorded_in(str(tmp_path / 'read_only.json'), write=False):
    decide('op', onednn=never_called, xla=never_called)
  assert not (tmp_path / 'read_only.json').exists()


@pytest.mark.parametrize('held', [
    {'op': 'xla'}, {'op': {'path': 'gpu', 'onednn_ms': 1.0, 'xla_ms': 2.0, 'measured': 'x'}},
    {'op': {'path': 'xla', 'xla_ms': 2.0, 'measured': 'x'}}, ['op']],
    ids=['a string', 'an unknown path', 'no time', 'a list'])
def test_a_cache_entry_not_as_stored_is_measured_again_and_replaced(fresh, held):
  # A hand edit, or an entry written by another version of cnnjax: not a decision.
  other = {'path': 'xla', 'onednn_ms': 2.0, 'xla_ms': 1.0, 'measured': '2026-12-07T16:00:00'}
  fresh.write_text(json.dumps({MACHINE: held, 'another machine': {'op': other}}))
  d = decide('op')
  assert d.path == 'onednn' and 'measured now' in d.why
  stored = json.loads(fresh.read_text())
  assert stored[MACHINE]['op'] == d.entry and stored['another machine'] == {'op': other}


def test_a_cache_the_disk_cannot_take_stays_whole_and_leaves_no_temp_file(fresh, monkeypatch):
  theirs = {'path': 'xla', 'onednn_ms': 2.0, 'xla_ms': 1.0, 'measured': '2026-12-07T16:00:00'}
  fresh.write_text(json.dumps({'another machine': {'op': theirs}}))
  before = fresh.read_text()

  def disk_full(data, f, **kwargs):
    f.write('{"half')
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(kernel_choice.json, 'dump', disk_full)
  d = decide('op')
  assert d.path == 'onednn' and 'not cached' in d.why and 'No space left' in d.why
  assert fresh.read_text() == before
  assert sorted(os.listdir(fresh.parent)) == ['choices.json', 'choices.json.lock']


def test_an_unwritable_cache_still_decides_and_says_so(monkeypatch, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  monkeypatch.setenv('CNNJAX_KERNEL_CACHE', str(blocker / 'choices.json'))  # under a file
  monkeypatch.setattr(kernel_choice, '_made', {})
  d = decide('op')
  assert d.path == 'onednn' and 'not cached' in d.why


CHOICES = '''
import jax, jax.numpy as jnp
from cnnjax import kernels, ops
x = jnp.ones((8, 12, 12, 64))
jax.eval_shape(jax.grad(lambda x: ops.lrn(x, 4, 1.0, 0.001 / 9, 0.75).sum()), x)
print(kernels.machine())
print(kernels.describe().splitlines()[-1])
'''


def run_choices(tmp_path, **env):
  """The machine key and the LRN's decision line of a subprocess; env: variables to set
  there, None to unset one."""
  result = run_code(CHOICES, env={'CNNJAX_KERNEL_CACHE': str(tmp_path / 'c.json'),
                                  'CNNJAX_CPU_KERNELS': 'auto', **env}, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.splitlines()


def test_an_avx2_cap_takes_lrn_off_onednns_reference_kernel_and_keys_the_cache(tmp_path):
  if not kernels.available():
    pytest.skip(kernels.describe())
  machine, lrn = run_choices(tmp_path, ONEDNN_MAX_CPU_ISA='AVX2')
  # oneDNN 3.2 has only its reference LRN for NHWC on AVX2 (docs/RESULTS.md).
  assert 'ISA avx2' in machine
  assert lrn.strip().startswith('lrn 8x12x12x64') and ': XLA, as oneDNN has only its reference ref:' in lrn
  # Uncapped: without the cap a user's environment may hold (emulating an AVX2 machine).
  uncapped, lrn = run_choices(tmp_path, ONEDNN_MAX_CPU_ISA=None)
  if cpu.vector_isa() == 'avx512':  # on AVX-512 its LRN is a JIT kernel: measured instead
    assert uncapped != machine
    assert 'lrn_jit' in lrn and 'measured now' in lrn


def test_a_faster_xla_formulation_keys_the_cache_anew(monkeypatch):
  # Choices cached against an older, slower formulation in cnnjax/ops.py are not reused.
  if not kernels.available():
    pytest.skip(kernels.describe())
  current = kernels.machine()
  assert current.endswith(f'; cnnjax XLA formulations {kernels.XLA_FORMULATIONS}')
  monkeypatch.setattr(kernels, 'XLA_FORMULATIONS', kernels.XLA_FORMULATIONS + 1)
  kernels.machine.cache_clear()
  try:
    assert kernels.machine() != current
  finally:
    kernels.machine.cache_clear()


def test_cap_isa_sets_both_libraries_caps(monkeypatch):
  unset_env(monkeypatch, 'ONEDNN_MAX_CPU_ISA')  # cap_isa sets it: the tests after keep none
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX')
  cpu.cap_isa_from_argv(['run.py', '--isa', 'avx2'])
  assert os.environ['ONEDNN_MAX_CPU_ISA'] == 'AVX2'
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX2'
  assert cpu.caps() == 'ONEDNN_MAX_CPU_ISA=AVX2, --xla_cpu_max_isa=AVX2'
  with pytest.raises(ValueError, match='isa must be one of'):
    cpu.cap_isa('avx3')


def convolution_forms(hlo):
  """The dim_labels of every convolution in compiled HLO text."""
  return re.findall(r' convolution\(.*?dim_labels=(\S+?),', hlo)


def test_xlas_path_runs_every_convolution_of_the_train_steps_in_canonical_form(monkeypatch):
  # XLA:CPU's fast (Eigen) convolution needs NHWC x HWIO -> NHWC; its pass that rewrites
  # other forms into it only sees the module's top level, not the lax.scan of the steps,
  # where the others run as a naive loop (~100x slower). K = 10 and K = 1 are both scans.
  with kernels.using('xla'):
    for k in (10, 1):
      hlo = bench.Synthetic(small_config(batch_size=16, steps_per_dispatch=k)).compiled_text()
      assert 'while(' in hlo or k == 1
      forms = convolution_forms(hlo)
      assert len(forms) == 2 + 2 + 1, forms  # Recipe A: two forwards, both gradients of conv2,
      assert set(forms) == {'b01f_01io->b01f'}, forms  # conv1's kernel gradient
    # The check can fail: with JAX's own autodiff of the convolution (what cnnjax ran
    # before), the gradients inside the loop are not canonical.
    monkeypatch.setattr(ops, '_canonical_conv', ops._plain_conv)
    hlo = bench.Synthetic(small_config(batch_size=16)).compiled_text()
    assert set(convolution_forms(hlo)) - {'b01f_01io->b01f'}


def test_xlas_path_runs_every_convolution_of_recipe_f_in_canonical_form(monkeypatch):
  # VGG-16's 3x3 kernels on CIFAR's 2x2 maps: XLA's algebraic simplifier swaps the operands
  # of a convolution whose kernel is larger than its input, a form XLA:CPU then runs as its
  # naive loop, ~70x slower, even at the top level; ops._eigen_conv pads those inputs first.
  with kernels.using('xla'):
    hlo = bench.Synthetic(recipe_config('cifar_vgg16', batch_size=4,
                                        steps_per_dispatch=1)).compiled_text()
    forms = convolution_forms(hlo)
    assert len(forms) == 13 + 13 + 12, forms  # forwards, kernel and input gradients
    assert set(forms) == {'b01f_01io->b01f'}, forms
    # The check can fail: with XLA's own padding inside the convolution (as before), the
    # forward and the input gradient of a 2x2 map come out swapped.
    monkeypatch.setattr(ops, '_eigen_conv', ops._plain_conv)

    def out_and_grads(x, w, b):
      out, vjp = jax.vjp(lambda *a: ops.conv2d(*a, relu=True), x, w, b)
      return out, vjp(out)
    hlo = jax.jit(out_and_grads).lower(
        jnp.ones((4, 2, 2, 8)), jnp.ones((3, 3, 8, 16)), jnp.ones(16)).compile().as_text()
  assert len(set(convolution_forms(hlo)) - {'b01f_01io->b01f'}) > 0


@pytest.mark.parametrize('shape,kernel,stride,padding', [
    ((4, 12, 12, 64), (5, 5, 64, 64), 1, 'SAME'),
    ((3, 9, 7, 5), (3, 3, 5, 6), 2, 'SAME'),
    ((2, 8, 9, 4), (3, 3, 4, 8), 2, 'VALID'),
])
def test_canonical_convolution_gradients_equal_jaxs_bit_for_bit(shape, kernel, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
  strides = (stride, stride)
  pads = jax.lax.padtype_to_pads(shape[1:3], kernel[:2], strides, padding)
  plain = ops._plain_conv
  out_shape = jax.eval_shape(lambda x, w: plain(x, w, strides, pads), x, w).shape
  dy = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

  def grads(conv):  # a plain jit: XLA canonicalizes JAX's own gradients there
    return jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: conv(x, w, strides, pads), x, w)[1](dy))(
        x, w, dy)

  for ours, theirs in zip(grads(ops._canonical_conv), grads(plain), strict=True):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_machine_line_names_the_cpu_and_its_caps():
  line = cpu.describe()
  assert line.startswith(f'CPU: {cpu.model()}, {cpu.cores()} cores, {cpu.vector_isa()}; ISA caps: ')


@pytest.mark.skipif(cpu.vector_isa() == 'avx2', reason='an AVX2 machine runs these '
                    'paths natively: tests/test_ops.py itself checks them')
def test_tf_fidelity_holds_on_the_avx2_paths():
  """The TF op tests again in a process capped at AVX2: oneDNN's AVX2 kernels, and XLA's
  LRN where oneDNN has only its reference one (on an AVX2 machine: its native paths)."""
  onednn, xla = cpu.ISA_CAPS['avx2']
  env = child_env({'ONEDNN_MAX_CPU_ISA': onednn,
                   'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} --xla_cpu_max_isa={xla}'})
  result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           'tests/test_ops.py', '-k', 'matches_tf or like_tf'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stdout[-3000:]
  assert re.search(r'\d+ passed', result.stdout), result.stdout[-500:]
