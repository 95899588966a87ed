"""Which attention a run takes, and that a kernel cannot surprise it (`model/kernel_probe.py`):
'auto' takes a kernel only where `model/verified_kernels.py` lists it, a kernel that fails
or disagrees with 'xla' at the run's own shape sends an 'auto' run to 'xla' with one line
and is a one-line error when named; the package imports, runs forward and trains on a CPU
without the private or moving jax modules the kernels need; `dtype='auto'`."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from additive_jax.model import attention, flash_pallas, kernel_probe
from additive_jax.model.config import compute_dtype_name
from additive_jax.peft import IA3
from additive_jax.train import loop
from cli_helpers import ROOT, in_process_config

SHAPE = kernel_probe.BlockShape(seq_len=24, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32,
                                num_prefix=3, num_virtual=2)
real_flash = flash_pallas.flash_attention


def failing(*args, **kwargs):
  raise RuntimeError('Shared memory size limit exceeded: 233472 > 232448\nmore detail')


def off_by_a_percent(*args, **kwargs):
  return real_flash(*args, **kwargs) * 1.01


@pytest.fixture
def auto_picks_pallas(monkeypatch):
  """A table that lists 'pallas' for this CPU, as a device check would for a GPU."""
  monkeypatch.setattr(attention, 'auto_kernel', lambda *where: 'pallas')


@pytest.mark.parametrize('broken, reason', [
    (failing, r"it failed at this shape \(RuntimeError: Shared memory size limit exceeded: "
              r"233472 > 232448\)"),
    (off_by_a_percent, r"its output differs from 'xla' by 1\.\d+e-02 \(relative; float32 "
                       r"allows 1e-04\)")])
def test_a_kernel_that_fails_at_setup_gives_xla_under_auto_and_an_error_when_named(
    auto_picks_pallas, monkeypatch, broken, reason):
  monkeypatch.setattr(flash_pallas, 'flash_attention', broken)
  name, note = kernel_probe.choose_attention('auto', SHAPE)
  assert name == 'xla'
  assert '\n' not in note
  assert note.startswith("attention: 'auto' would run 'pallas' on this cpu, but ")
  assert note.endswith("; running 'xla'")
  assert re.search(reason, note)
  with pytest.raises(attention.KernelUnavailable, match=reason) as named:
    kernel_probe.choose_attention('pallas', SHAPE)
  assert '\n' not in str(named.value)
  assert str(named.value).startswith(
      "config.attention='pallas' at this run's shape (T=24, head dim 16, float32, 3 prefix and "
      "2 prompt slots): ")


def test_a_working_kernel_is_kept_and_pallas_on_a_cpu_is_noted(auto_picks_pallas):
  for requested in ('auto', 'pallas'):
    name, note = kernel_probe.choose_attention(requested, SHAPE)
    assert name == 'pallas'
    assert note == ("attention: 'pallas' on a CPU runs in the Pallas interpreter, orders of "
                    "magnitude slower than 'xla' (meant for tests)")
  assert kernel_probe.choose_attention('xla', SHAPE) == ('xla', None)


def test_a_run_whose_auto_kernel_fails_trains_with_xla_and_says_so(
    auto_picks_pallas, monkeypatch, tiny_with_tokenizer, small_sst2, tmp_path, capsys):
  monkeypatch.setattr(flash_pallas, 'flash_attention', failing)
  config = in_process_config(tiny_with_tokenizer, small_sst2, [IA3()])
  config.seq_len, config.num_steps, config.eval_every = 32, 1, 0
  loop.train_and_evaluate(config, str(tmp_path / 'auto'))
  printed = capsys.readouterr().out
  assert "cpu (cpu): computing in float32 (auto), attention 'xla' (auto)" in printed
  assert "attention: 'auto' would run 'pallas' on this cpu, but it failed at this shape" in printed
  config.attention = 'pallas'
  with pytest.raises(attention.KernelUnavailable, match="config.attention='pallas' at this run"):
    loop.train_and_evaluate(config, str(tmp_path / 'named'))


def test_dtype_auto_is_bf16_on_accelerators_and_fp32_on_a_cpu():
  assert compute_dtype_name('auto', 'cpu') == 'float32'
  assert compute_dtype_name('auto', 'gpu') == 'bfloat16'
  assert compute_dtype_name('auto', 'tpu') == 'bfloat16'
  assert compute_dtype_name('auto') == 'float32'  # this machine
  assert compute_dtype_name('float32', 'tpu') == 'float32'
  assert compute_dtype_name('bfloat16', 'cpu') == 'bfloat16'


# (`jax._src.distributed`, which train/preemption.py reads when a run starts, cannot be hidden
# here: Orbax and jax.experimental.multihost_utils import it themselves.)
HIDDEN = ('jax._src.cudnn.fused_attention_stablehlo',
          'jax.experimental.pallas.ops.tpu.splash_attention', 'jax.experimental.pallas')


def test_the_package_needs_no_private_or_moving_jax_module(tiny_with_tokenizer, small_sst2,
                                                           tmp_path):
  """In a fresh interpreter with the kernels' modules unimportable (as if a jax inside the
  declared range had moved them): import, a forward pass and a train step on the CPU work,
  and naming a kernel is one line."""
  script = textwrap.dedent(f'''
      import sys
      import jax
      for name in {HIDDEN!r}:
        sys.modules[name] = None  # `import name` now raises ImportError ...
        parent, _, child = name.rpartition('.')
        if hasattr(sys.modules.get(parent), child):  # ... and so does `from parent import child`
          delattr(sys.modules[parent], child)
      import jax.numpy as jnp
      import additive_jax as aj
      from additive_jax.model import attention, kernel_probe
      from additive_jax.model.llama import Llama
      from additive_jax.peft import IA3
      from additive_jax.train import loop
      sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
      from cli_helpers import in_process_config
      config, params = aj.load_model({tiny_with_tokenizer!r})
      logits = Llama(config).apply({{'params': params}}, jnp.ones((1, 5), jnp.int32))
      assert jnp.isfinite(logits).all()
      run = in_process_config({tiny_with_tokenizer!r}, {small_sst2!r}, [IA3()])
      run.seq_len, run.num_steps, run.eval_every = 32, 2, 0
      summary = loop.train_and_evaluate(run, {str(tmp_path / 'run')!r})
      assert summary['final_loss'] > 0
      shape = kernel_probe.BlockShape(16, 4, 2, 16, jnp.float32)
      for name in ('pallas', 'splash', 'cudnn'):
        try:
          kernel_probe.choose_attention(name, shape) if name == 'pallas' else attention.attend(
              jnp.ones((1, 16, 4, 16)), jnp.ones((1, 16, 2, 16)), jnp.ones((1, 16, 2, 16)),
              jnp.ones((1, 16), jnp.int32), implementation=name, interpret=True)
        except attention.KernelUnavailable as err:
          print('REFUSED', err)
      print('TRAINED', summary['final_loss'])
  ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env={**os.environ,
                               'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode == 0, result.stderr[-3000:]
  refused = [line for line in result.stdout.splitlines() if line.startswith('REFUSED')]
  assert 'TRAINED' in result.stdout
  assert len(refused) == 3, result.stdout
  version = jax.__version__
  assert refused[0] == (
      f"REFUSED attention 'pallas' needs additive_jax.model.flash_pallas, which cannot be "
      f"imported with jax {version} (ModuleNotFoundError: import of jax.experimental.pallas "
      "halted; None in sys.modules); use --config.attention=xla")
  assert refused[1].startswith(
      "REFUSED attention 'splash' needs jax.experimental.pallas.ops.tpu.splash_attention")
  # cuDNN on a CPU: its version check hands over to the Pallas kernel, which is missing too
  assert refused[2].startswith("REFUSED attention ")
