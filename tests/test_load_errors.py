"""Bad checkpoints fail with an error that names the problem, before anything is returned."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import safetensors.numpy
import torch

import additive_jax as aj
from additive_jax.model.config import ConfigError
from additive_jax.model.convert import ModelLoadError
from additive_jax.model.load import load_config
from conftest import save_tiny_hf_llama


@pytest.fixture
def checkpoint(tmp_path):
  save_tiny_hf_llama(tmp_path)
  return tmp_path


def edit_config(directory, **changes):
  path = directory / 'config.json'
  config = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      config.pop(key)
    else:
      config[key] = value
  path.write_text(json.dumps(config))


def edit_tensors(directory, edit):
  path = str(directory / 'model.safetensors')
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path)


def test_missing_config_field(checkpoint):
  edit_config(checkpoint, hidden_size=None)
  with pytest.raises(ConfigError, match="'hidden_size' is missing"):
    aj.load_model(str(checkpoint))


def test_mistyped_config_field(checkpoint):
  edit_config(checkpoint, num_hidden_layers='three')
  with pytest.raises(ConfigError, match="'num_hidden_layers' must be int, got str"):
    aj.load_model(str(checkpoint))


def test_unsupported_architecture_is_named(checkpoint):
  edit_config(checkpoint, architectures=['MistralForCausalLM'], model_type='mistral')
  with pytest.raises(ConfigError, match='MistralForCausalLM'):
    aj.load_model(str(checkpoint))


def test_invalid_json_config_is_named(checkpoint):
  (checkpoint / 'config.json').write_text('{"hidden_size": 48,')
  with pytest.raises(ConfigError, match=r'config\.json: not valid JSON'):
    load_config(str(checkpoint / 'config.json'))
  with pytest.raises(ConfigError, match=r'config\.json: not valid JSON'):
    aj.load_model(str(checkpoint))


def test_config_json_file_is_named(checkpoint):
  edit_config(checkpoint, vocab_size='many')
  with pytest.raises(ConfigError, match=r"config\.json: config field 'vocab_size' must be int"):
    load_config(str(checkpoint / 'config.json'))


def test_zero_heads_refused(checkpoint):
  edit_config(checkpoint, num_attention_heads=0, head_dim=None)
  with pytest.raises(ConfigError, match="'num_attention_heads' must be positive"):
    aj.load_model(str(checkpoint))


@pytest.mark.parametrize('rope, message', [
    ({'rope_type': 'llama3', 'rope_theta': 5e5, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 16}, "'rope_parameters.factor' is missing"),
    ({'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0, 'low_freq_factor': 1.0,
      'high_freq_factor': 4.0}, "'rope_parameters.original_max_position_embeddings' is missing"),
    ({'rope_type': 'linear', 'rope_theta': 1e4}, "'rope_parameters.factor' is missing"),
    ({'rope_type': 'linear', 'factor': 'two'}, "'rope_parameters.factor' must be float, got str"),
    ({'rope_type': 'default', 'rope_theta': '1e4'}, "'rope_parameters.rope_theta' must be float"),
], ids=['llama3_no_factor', 'llama3_no_original_max', 'linear_no_factor', 'bad_factor',
        'bad_theta'])
def test_rope_fields_are_named(checkpoint, rope, message):
  edit_config(checkpoint, rope_parameters=rope)
  with pytest.raises(ConfigError, match=f'config.json: config field {message}'):
    aj.load_model(str(checkpoint))


def test_transformers4_rope_fields_are_named(checkpoint):
  edit_config(checkpoint, rope_parameters=None, rope_theta=1e4,
              rope_scaling={'type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                            'high_freq_factor': 4.0, 'original_max_position_embeddings': 16.5})
  with pytest.raises(ConfigError,
                     match="'rope_scaling.original_max_position_embeddings' must be int"):
    aj.load_model(str(checkpoint))


def test_unsupported_rope_type_is_named(checkpoint):
  edit_config(checkpoint, rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0})
  with pytest.raises(ConfigError, match="rope type 'yarn'"):
    aj.load_model(str(checkpoint))


def test_missing_tensor_is_named(checkpoint):
  edit_tensors(checkpoint, lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    aj.load_model(str(checkpoint))


def test_misshapen_tensor_is_named(checkpoint):
  def shrink(tensors):
    tensors['model.layers.2.self_attn.k_proj.weight'] = np.zeros((8, 48), np.float32)
  edit_tensors(checkpoint, shrink)
  with pytest.raises(ModelLoadError, match=r"k_proj\.weight' has shape \(8, 48\), the config implies \(16, 48\)"):
    aj.load_model(str(checkpoint))


def test_corrupt_index_is_named(tmp_path):
  hf_model = save_tiny_hf_llama(tmp_path / 'one')
  hf_model.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
  index = tmp_path / 'sharded' / 'model.safetensors.index.json'
  index.write_text(index.read_text()[:40])
  with pytest.raises(ModelLoadError, match=r'model\.safetensors\.index\.json: not valid JSON'):
    aj.load_model(str(tmp_path / 'sharded'))
  index.write_text('{"weight_map": ["model-00001-of-00002.safetensors"]}')
  with pytest.raises(ModelLoadError, match=r'index\.json: no "weight_map" object'):
    aj.load_model(str(tmp_path / 'sharded'))


def test_truncated_safetensors(checkpoint):
  path = checkpoint / 'model.safetensors'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ModelLoadError, match='model.safetensors'):
    aj.load_model(str(checkpoint))


def test_garbage_safetensors_header(checkpoint):
  (checkpoint / 'model.safetensors').write_bytes(b'\xff' * 64)
  with pytest.raises(ModelLoadError, match='not a readable safetensors file'):
    aj.load_model(str(checkpoint))


def test_pickle_refused_unless_allowed(tmp_path):
  model = save_tiny_hf_llama(tmp_path / 'src')
  folder = tmp_path / 'bin'
  os.makedirs(folder)
  shutil.copy(tmp_path / 'src' / 'config.json', folder)
  torch.save(model.state_dict(), folder / 'pytorch_model.bin')
  with pytest.raises(ModelLoadError, match='pickle'):
    aj.load_model(str(folder))
  config, params = aj.load_model(str(folder), allow_pickle=True)
  _, reference = aj.load_model(str(tmp_path / 'src'))
  np.testing.assert_array_equal(params['layers']['mlp']['down_proj']['kernel'],
                                reference['layers']['mlp']['down_proj']['kernel'])


def test_corrupt_pickle_is_named(checkpoint):
  os.remove(checkpoint / 'model.safetensors')
  (checkpoint / 'pytorch_model.bin').write_bytes(b'PK\x03\x04' + b'\0' * 60)
  with pytest.raises(ModelLoadError, match=r'pytorch_model\.bin: not a readable tensor pickle'):
    aj.load_model(str(checkpoint), allow_pickle=True)


def test_missing_path():
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    aj.load_model('/nonexistent/model')


def test_truncated_gguf(tmp_path, smollm2_gguf):
  broken = tmp_path / 'broken.gguf'
  with open(smollm2_gguf, 'rb') as src:
    broken.write_bytes(src.read(5_000_000))
  with pytest.raises(ModelLoadError, match='broken.gguf'):
    aj.load_model(str(broken))


def test_not_a_gguf(tmp_path):
  bogus = tmp_path / 'bogus.gguf'
  bogus.write_bytes(b'GGML' + b'\0' * 100)
  with pytest.raises(ModelLoadError, match='not a readable GGUF file'):
    aj.load_model(str(bogus))


def write_gguf_metadata(path, **fields):
  """A GGUF file with tiny llama metadata, a 3-token tokenizer and no tensors; `fields` add
  to it or, where None, remove from it."""
  metadata = {'llama.embedding_length': 64, 'llama.feed_forward_length': 128,
              'llama.block_count': 2, 'llama.attention.head_count': 4,
              'llama.attention.layer_norm_rms_epsilon': 1e-5, 'llama.vocab_size': 3,
              'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.tokens': ['a', 'b', 'ab'],
              'tokenizer.ggml.merges': ['a b']}
  metadata.update(fields)
  writer = gguf.GGUFWriter(str(path), 'llama')
  for key, value in metadata.items():
    if value is None:
      continue
    kind = {str: gguf.GGUFValueType.STRING, int: gguf.GGUFValueType.UINT32,
            float: gguf.GGUFValueType.FLOAT32, list: gguf.GGUFValueType.ARRAY}[type(value)]
    writer.add_key_value(key, value, kind, gguf.GGUFValueType.STRING if kind is
                         gguf.GGUFValueType.ARRAY else None)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.mark.parametrize('key', ['tokenizer.ggml.tokens', 'tokenizer.ggml.merges',
                                 'tokenizer.ggml.model'])
def test_gguf_without_tokenizer_is_named(tmp_path, key):
  path = write_gguf_metadata(tmp_path / 'no_tokenizer.gguf', **{key: None})
  with pytest.raises(ValueError, match=f"no_tokenizer.gguf: metadata field '{key}' is missing"):
    aj.load_tokenizer(path)


def test_gguf_special_token_outside_the_vocabulary_is_named(tmp_path):
  path = write_gguf_metadata(tmp_path / 'bad_eos.gguf', **{'tokenizer.ggml.eos_token_id': 7})
  with pytest.raises(ValueError,
                     match="bad_eos.gguf: metadata field 'tokenizer.ggml.eos_token_id' is 7"):
    aj.load_tokenizer(path)


def test_gguf_tokenizer_reads_the_written_vocabulary(tmp_path):
  tokenizer = aj.load_tokenizer(write_gguf_metadata(tmp_path / 'tiny.gguf'))
  assert tokenizer('abab')['input_ids'] == [2, 2]


@pytest.mark.parametrize('fields, message', [
    ({'llama.embedding_length': None}, "'llama.embedding_length' is missing"),
    ({'llama.block_count': 'two'}, "'llama.block_count' must be int, got 'two'"),
    ({'llama.rope.scaling.type': 'linear'}, "'llama.rope.scaling.factor' is missing"),
    ({'llama.rope.scaling.type': 'yarn'}, "'llama.rope.scaling.type' is 'yarn'"),
], ids=['missing', 'mistyped', 'linear_no_factor', 'unsupported_scaling'])
def test_gguf_config_fields_are_named(tmp_path, fields, message):
  path = write_gguf_metadata(tmp_path / 'bad.gguf', **fields)
  with pytest.raises(ConfigError, match=f'bad.gguf: metadata field {message}'):
    load_config(path)
