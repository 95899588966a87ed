"""AdapterHub bottleneck adapter files: round trips and errors here, and AdapterHub itself
(bottleneck adapters, Compacters, ReFT, LoRA, prefixes, their unions and AdapterFusion;
Compacter's own file tests are in test_peft_compacter.py, AdapterFusion's in
test_peft_fusion.py).

AdapterHub pins transformers 4.57, so the cross-check against it runs in its own
venv (tests/adapterhub/run.sh: about 32 s on 2 cores once it exists, SmolLM2's export
included, about 10 s more when it creates the venv; it needs PyPI for `adapters` and
transformers 4.57). ADDITIVE_JAX_ADAPTERHUB=0 skips it.
"""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import additive_jax as aj
from additive_jax.model.llama import Llama
from additive_jax.peft.files import AdapterFileError, load_adapter, save_adapter
from adapter_files_helpers import random_peft
from conftest import TINY as CONFIG

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# our side of the cross-check, for its SmolLM2 export (a script, loaded from its file)
_SPEC = importlib.util.spec_from_file_location(
    'jax_side', os.path.join(REPOSITORY, 'tests', 'adapterhub', 'jax_side.py'))
jax_side = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(jax_side)
# our placements, AdapterHub's fields for them, and a width that is no divisor of 48 (houlsby)
PLACEMENTS = {
    'pfeiffer': (aj.peft.Bottleneck(6, 'pfeiffer', 'gelu'),
                 dict(mh_adapter=False, original_ln_before=True, is_parallel=False,
                      init_weights='bert', non_linearity='gelu', reduction_factor=8, scaling=1.0)),
    'houlsby': (aj.peft.Bottleneck(5, 'houlsby', 'silu', scale=0.5),
                dict(mh_adapter=True, original_ln_before=False, is_parallel=False,
                     init_weights='bert', non_linearity='swish', reduction_factor=9.6, scaling=0.5)),
    'parallel': (aj.peft.Bottleneck(12, 'parallel', 'relu', scale=4),
                 dict(mh_adapter=False, original_ln_before=False, is_parallel=True,
                      init_weights='mam_adapter', non_linearity='relu', reduction_factor=4,
                      scaling=4.0)),
}


@pytest.fixture(scope='module')
def params():
  return nn.unbox(Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))['params']


@pytest.mark.parametrize('placement', PLACEMENTS)
def test_round_trip_and_adapterhub_names(params, tmp_path, placement):
  method, fields = PLACEMENTS[placement]
  peft = random_peft((method,), CONFIG)
  save_adapter(str(tmp_path), (method,), peft, CONFIG, format='adapterhub',
               base_model_name_or_path='tiny')
  with open(tmp_path / 'adapter_config.json', encoding='utf-8') as f:
    saved = json.load(f)
  assert {k: saved['config'][k] for k in fields} == fields
  assert type(saved['config']['scaling']) is float  # AdapterHub refuses an integer scaling
  assert int(48 // saved['config']['reduction_factor']) == method.dim
  assert {k: v for k, v in saved.items() if k != 'config'} == {
      'hidden_size': 48, 'model_class': 'LlamaForCausalLM', 'model_name': 'tiny',
      'model_type': 'llama', 'name': 'bottleneck', 'version': 'adapters.1.3.0'}
  tensors = load_file(tmp_path / 'adapter.safetensors')
  prefix = 'model.layers.2.output_adapters.adapters.bottleneck.'
  mlp = peft['bottleneck']['mlp']
  np.testing.assert_array_equal(tensors[prefix + 'adapter_down.0.weight'], mlp['down'][2].T)
  np.testing.assert_array_equal(tensors[prefix + 'adapter_up.bias'], mlp['up_bias'][2])
  assert len(tensors) == 4 * 3 * len(method.sites)

  methods, loaded = load_adapter(str(tmp_path), CONFIG)
  assert methods == (method,)
  for site in method.sites:
    for leaf, value in peft['bottleneck'][site].items():
      np.testing.assert_array_equal(loaded['bottleneck'][site][leaf], value)
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 101, (2, 7)))
  model = Llama(CONFIG, peft=methods)
  np.testing.assert_array_equal(np.asarray(model.apply({'params': params, 'peft': loaded}, tokens)),
                                np.asarray(model.apply({'params': params, 'peft': peft}, tokens)))


def test_reduction_factor_reads_back_as_its_width(tmp_path):
  method = aj.peft.Bottleneck(placement='parallel', reduction_factor=7.0)
  save_adapter(str(tmp_path), (method,), random_peft((method,), CONFIG), CONFIG, format='adapterhub')
  assert json.loads((tmp_path / 'adapter_config.json').read_text())['config']['reduction_factor'] == 7.0
  assert load_adapter(str(tmp_path), CONFIG)[0] == (aj.peft.Bottleneck(6, 'parallel'),)


@pytest.fixture
def houlsby_dir(tmp_path):
  method = PLACEMENTS['houlsby'][0]
  save_adapter(str(tmp_path), (method,), random_peft((method,), CONFIG), CONFIG, format='adapterhub')
  return tmp_path


@pytest.mark.parametrize('change, match', [
    ({'ln_after': True}, r'ln_after=True \(needs False\): not a plain seq_bn'),
    ({'phm_layer': True, 'use_gating': True}, r'a gated Compacter \(use_gating\) is not read here'),
    ({'residual_before_ln': False}, r'residual_before_ln=False \(needs True\)'),
    ({'original_ln_before': True}, r"\{'mh_adapter': True, 'original_ln_before': True, "
                                   r"'is_parallel': False\} is none of seq_bn"),
    ({'non_linearity': 'tanh'}, r"non_linearity 'tanh' is not one of relu, gelu, swish, silu"),
    ({'reduction_factor': {'default': 16}}, r"reduction_factor=\{'default': 16\}; only a single"),
    ({'architecture': 'prompt_tuning'}, r"architecture 'prompt_tuning' is not read here"),
])
def test_unsupported_adapterhub_configs_are_named(houlsby_dir, change, match):
  path = houlsby_dir / 'adapter_config.json'
  raw = json.loads(path.read_text())
  raw['config'].update(change)
  path.write_text(json.dumps(raw))
  with pytest.raises(AdapterFileError, match=f'{path}: {match}'):
    load_adapter(str(houlsby_dir), CONFIG)


def test_adapter_for_another_base_names_the_tensors(houlsby_dir):
  with pytest.raises(AdapterFileError) as err:
    load_adapter(str(houlsby_dir), CONFIG.replace(hidden_size=96, num_layers=4))
  message = str(err.value)
  assert 'the adapter was saved for hidden_size=48 (this model: 96)' in message
  assert ("tensor 'model.layers.0.attention_adapters.adapters.bottleneck.adapter_down.0.weight' has "
          'shape (5, 48), this model needs (10, 96)') in message


def test_legacy_gelu_is_the_tanh_approximation(houlsby_dir):
  """adapter-transformers files (no "version") meant gelu_new by "gelu", as AdapterHub renames it."""
  path = houlsby_dir / 'adapter_config.json'
  raw = json.loads(path.read_text())
  raw['config']['non_linearity'] = 'gelu'
  path.write_text(json.dumps({k: v for k, v in raw.items() if k != 'version'}))
  with pytest.raises(AdapterFileError, match="non_linearity 'gelu_new' is not one of"):
    load_adapter(str(houlsby_dir), CONFIG)


def test_pickle_is_refused_unless_allowed(houlsby_dir):
  import torch
  tensors = load_file(houlsby_dir / 'adapter.safetensors')
  torch.save({k: torch.tensor(v) for k, v in tensors.items()}, houlsby_dir / 'pytorch_adapter.bin')
  os.remove(houlsby_dir / 'adapter.safetensors')
  with pytest.raises(AdapterFileError, match='holds pytorch_adapter.bin, a pickle.*allow_pickle=True'):
    load_adapter(str(houlsby_dir), CONFIG)
  assert load_adapter(str(houlsby_dir), CONFIG, allow_pickle=True)[0] == (PLACEMENTS['houlsby'][0],)


@pytest.mark.skipif(os.environ.get('ADDITIVE_JAX_ADAPTERHUB') == '0',
                    reason='AdapterHub cross-check skipped (ADDITIVE_JAX_ADAPTERHUB=0)')
def test_adapterhub_itself_reads_ours_and_we_read_its(smollm2, tmp_path):
  jax_side.export_smollm2(str(tmp_path), *smollm2)  # the session's SmolLM2, not a second load
  result = subprocess.run(['bash', os.path.join(REPOSITORY, 'tests', 'adapterhub', 'run.sh')],
                          env={**os.environ, 'MAIN_PYTHON': sys.executable,
                               'SMOLLM2_EXPORT': str(tmp_path)},
                          capture_output=True, text=True, check=False,
                          timeout=1200)  # a first run creates AdapterHub's venv
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert result.stdout.count('max relative error') == 1 + 16 + 14 + 1 + 5
