"""Our adapter files (aj_adapter_config.json + aj_adapter.safetensors), format detection, errors."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.model.llama import Llama
from additive_jax.peft.files import AdapterFileError, detect_format, load_adapter, save_adapter
from adapter_files_helpers import assert_same_leaves, random_peft
from conftest import TINY as CONFIG

# every method at least once; the combination holds the backbone methods together
SINGLE = [aj.peft.Bottleneck(5, 'pfeiffer', 'gelu'),
          aj.peft.Bottleneck(placement='parallel', scale=4.0, reduction_factor=6.0),
          aj.peft.PromptTuning(3, init='text', text='hello'),
          aj.peft.PrefixTuning(4),
          aj.peft.PTuning(3, encoder='lstm', encoder_hidden=5),
          aj.peft.LadderSide(reduction=2)]
COMBINATION = (aj.peft.Bottleneck(5, 'houlsby', 'silu', scale=2.0), aj.peft.IA3(),
               aj.peft.LoRA(2, 4, ('k', 'down')), aj.peft.PromptTuning(2),
               aj.peft.PrefixTuning(3, projection_dim=4))


@pytest.fixture(scope='module')
def params():
  boxed = Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return nn.unbox(boxed)['params']


@pytest.fixture(scope='module')
def tokens():
  return jnp.asarray(np.random.RandomState(1).randint(0, 101, (2, 7)))


def logits(methods, params, peft, tokens):
  return np.asarray(Llama(CONFIG, peft=tuple(methods)).apply({'params': params, 'peft': peft}, tokens))


@pytest.mark.parametrize('methods', [(m,) for m in SINGLE] + [COMBINATION],
                         ids=[m.call_string() for m in SINGLE] + ['combination'])
def test_round_trip_gives_identical_leaves_and_logits(params, tokens, tmp_path, methods):
  peft = random_peft(methods, CONFIG)
  save_adapter(str(tmp_path), methods, peft, CONFIG)
  assert sorted(os.listdir(tmp_path)) == ['aj_adapter.safetensors', 'aj_adapter_config.json']
  loaded_methods, loaded = load_adapter(str(tmp_path), CONFIG, expected_methods=methods)
  assert loaded_methods == methods
  assert_same_leaves(loaded, peft)
  np.testing.assert_array_equal(logits(loaded_methods, params, loaded, tokens),
                                logits(methods, params, peft, tokens))


def test_config_is_readable_at_a_glance(tmp_path):
  methods = (aj.peft.Bottleneck(16, 'houlsby', 'gelu'), aj.peft.IA3())
  save_adapter(str(tmp_path), methods, random_peft(methods, CONFIG), CONFIG,
               base_model_name_or_path='HuggingFaceTB/SmolLM2-135M-Instruct')
  with open(tmp_path / 'aj_adapter_config.json', encoding='utf-8') as f:
    record = json.load(f)
  assert record['library_version'] == aj.__version__
  assert record['base_model_name_or_path'] == 'HuggingFaceTB/SmolLM2-135M-Instruct'
  assert record['base_model'] == {'vocab_size': 101, 'hidden_size': 48, 'intermediate_size': 80,
                                  'num_layers': 3, 'num_heads': 6, 'num_kv_heads': 2, 'head_dim': 8}
  bottleneck, ia3 = record['methods']
  assert bottleneck == {'method': "Bottleneck(dim=16, placement='houlsby', activation='gelu')",
                        'adapter_type': 'bottleneck', 'bottleneck_dim': 16, 'non_linearity': 'gelu',
                        'adapter_placement': 'after_attn_and_ffn', 'scaling': 1.0, 'num_layers': 3,
                        'num_params': methods[0].num_params(CONFIG)}
  assert ia3['method'] == 'IA3()' and ia3['adapter_type'] == 'ia3'


@pytest.fixture
def saved(tmp_path):
  """An (IA)³ + LoRA adapter on CONFIG in tmp_path/adapter."""
  methods = (aj.peft.IA3(), aj.peft.LoRA(2, 4))
  directory = tmp_path / 'adapter'
  save_adapter(str(directory), methods, random_peft(methods, CONFIG), CONFIG)
  return directory


def test_adapter_for_another_base_names_the_tensors_and_shapes(saved):
  other = CONFIG.replace(intermediate_size=96, num_kv_heads=3)
  with pytest.raises(AdapterFileError) as err:
    load_adapter(str(saved), other)
  message = str(err.value)
  assert str(saved / 'aj_adapter.safetensors') in message
  assert "tensor 'ia3/l_ff' has shape (3, 80), this model needs (3, 96)" in message
  assert "tensor 'ia3/l_k' has shape (3, 16), this model needs (3, 24)" in message
  assert 'intermediate_size=80 (this model: 96)' in message
  assert 'num_kv_heads=2 (this model: 3)' in message


def test_adapter_for_a_base_with_other_shape_facts_is_refused(saved):
  with pytest.raises(AdapterFileError,
                     match=r'saved for a base with vocab_size=101 \(this model: 103\)'):
    load_adapter(str(saved), CONFIG.replace(vocab_size=103))


def test_adapter_for_another_method_set_is_refused(saved):
  with pytest.raises(AdapterFileError, match=r"holds IA3\(\), LoRA\(rank=2, alpha=4\), not the "
                                             r"expected LoRA\(rank=2, alpha=4\)"):
    load_adapter(str(saved), CONFIG, expected_methods=(aj.peft.LoRA(2, 4),))


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_corrupt_or_truncated_weights_name_the_file(saved, damage):
  path = saved / 'aj_adapter.safetensors'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2] if damage == 'truncate' else b'\x12' * 64)
  with pytest.raises(AdapterFileError, match=f'{path}: not a readable safetensors file'):
    load_adapter(str(saved), CONFIG)


def test_corrupt_config_names_the_file(saved):
  path = saved / 'aj_adapter_config.json'
  path.write_text(path.read_text()[:40])
  with pytest.raises(AdapterFileError, match=f'{path}: not valid JSON'):
    load_adapter(str(saved), CONFIG)
  path.write_text(json.dumps({'methods': [{'method': 'Adapter(dim=3)'}]}))
  with pytest.raises(AdapterFileError, match=f"{path}: unknown method 'Adapter'"):
    load_adapter(str(saved), CONFIG)


def test_missing_files(saved, tmp_path):
  with pytest.raises(AdapterFileError, match='is not a directory'):
    load_adapter(str(tmp_path / 'nowhere'), CONFIG)
  with pytest.raises(AdapterFileError, match='holds no adapter'):
    load_adapter(str(tmp_path), CONFIG)
  os.remove(saved / 'aj_adapter.safetensors')
  with pytest.raises(AdapterFileError, match=f'{saved} has no aj_adapter.safetensors'):
    load_adapter(str(saved), CONFIG)


def test_two_formats_in_one_directory_need_format(tmp_path):
  method = aj.peft.IA3()
  peft = random_peft((method,), CONFIG)
  save_adapter(str(tmp_path), (method,), peft, CONFIG)
  save_adapter(str(tmp_path), (method,), peft, CONFIG, format='hf_peft')
  with pytest.raises(AdapterFileError, match=r'several formats \(aj, hf_peft\); pass format='):
    detect_format(str(tmp_path))
  for format in ('aj', 'hf_peft'):
    assert_same_leaves(load_adapter(str(tmp_path), CONFIG, format=format)[1], peft)


@pytest.mark.parametrize('format, methods, match', [
    ('hf_peft', (aj.peft.IA3(), aj.peft.PromptTuning(2)),
     r'PEFT files hold one method per directory, and IA3\(\), PromptTuning\(num_tokens=2\) are '
     r'several; save them with format="aj"'),
    ('adapterhub', (aj.peft.Bottleneck(4), aj.peft.IA3()), 'AdapterHub files hold one method'),
    ('hf_peft', (aj.peft.Bottleneck(4),), r'Bottleneck\(dim=4\) has no Hugging Face PEFT '
                                          r'equivalent.*use format="aj" or "adapterhub"'),
    ('hf_peft', (aj.peft.LadderSide(2),), r'LadderSide\(reduction=2\) has no Hugging Face PEFT'),
    ('adapterhub', (aj.peft.IA3(),), r'IA3\(\) is not written as an AdapterHub adapter'),
    ('adapterhub', (aj.peft.LoRA(targets=('o',)),), r"AdapterHub's LoRA acts on q, k, v, up and "
                                                     r"down projections only, not \['o'\]"),
    ('adapterhub', (aj.peft.PrefixTuning(3),), r"positions='from_zero'"),
    ('adapterhub', (aj.peft.LadderSide(2),), 'not written as an AdapterHub adapter'),
])
def test_formats_refuse_what_they_cannot_hold(tmp_path, format, methods, match):
  with pytest.raises(AdapterFileError, match=match):
    save_adapter(str(tmp_path), methods, random_peft(methods, CONFIG), CONFIG, format=format)
  assert not os.listdir(tmp_path)


def test_save_checks_the_tree_against_the_methods(tmp_path):
  method = aj.peft.LoRA(2, 4)
  peft = random_peft((aj.peft.LoRA(3, 4),), CONFIG)
  with pytest.raises(AdapterFileError, match=r"tensor 'lora/q/a' has shape \(3, 48, 3\), this model "
                                             r'needs \(3, 48, 2\)'):
    save_adapter(str(tmp_path), (method,), peft, CONFIG)
  with pytest.raises(ValueError, match=r"no subtree for \['ia3'\]"):
    save_adapter(str(tmp_path), (aj.peft.IA3(),), peft, CONFIG)


def test_a_folder_whose_files_differ_from_its_listing_is_refused(tmp_path):
  """complete.py: a folder written under `writing` loads; marked and not finished, or with a
  file that differs from its COMPLETE.json, it is refused naming the folder; unmarked loads."""
  from additive_jax.peft.files.complete import writing
  methods = (aj.peft.IA3(),)
  peft = random_peft(methods, CONFIG)
  with writing(str(tmp_path)) as folder:
    save_adapter(str(folder), methods, peft, CONFIG)
  assert sorted(os.listdir(tmp_path)) == ['COMPLETE.json', 'aj_adapter.safetensors',
                                          'aj_adapter_config.json']
  load_adapter(str(tmp_path), CONFIG)
  with open(tmp_path / 'aj_adapter.safetensors', 'ab') as f:
    f.write(b'more')
  with pytest.raises(AdapterFileError, match=f'^{tmp_path} is incomplete: '
                     'aj_adapter.safetensors differ from its COMPLETE.json; write it again$'):
    load_adapter(str(tmp_path), CONFIG)
  with pytest.raises(RuntimeError, match='killed'):
    with writing(str(tmp_path)) as folder:
      save_adapter(str(folder), methods, peft, CONFIG)
      raise RuntimeError('killed')
  with pytest.raises(AdapterFileError, match=f'^{tmp_path} is half-written'):
    load_adapter(str(tmp_path), CONFIG)
  os.remove(tmp_path / 'WRITING')  # as HF PEFT or an older export leaves a folder: no marker
  load_adapter(str(tmp_path), CONFIG)
