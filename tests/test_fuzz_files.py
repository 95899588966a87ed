"""Fuzzed files: adapter files of the three formats through `aj.peft.load_adapter`, and base
checkpoints (an HF directory of safetensors, a GGUF file) through `aj.load_model`, each with a
corrupted config, a corrupted header, wrong shapes, missing tensors or random bytes.

The property: a result, or the documented error naming the file: `AdapterFileError` for an
adapter (peft/files/file_io.py), `ConfigError` or `ModelLoadError` for a base
(model/config.py, model/convert.py). Anything else escaping (a KeyError, a TypeError of an
unhashable JSON value, a struct or numpy error) is a bug. Loading only reads: the folder is the
same after, bit for bit.

A header that claims a huge tensor: tests/test_fuzz_memory.py.
"""

import json
import os
import re
import shutil
import struct
import tempfile

from hypothesis import given
from hypothesis import strategies as st
import pytest

import additive_jax as aj
from additive_jax.model.config import ConfigError
from additive_jax.model.convert import ModelLoadError
from additive_jax.peft.param_count import leaf_shapes
from additive_jax.peft.files import AdapterFileError, load_adapter
from additive_jax.peft.files.aj_format import flat_leaves
from conftest import TINY
from fuzz_file_helpers import (ADAPTERS, BASE_ERRORS, HUGE, SMALL, join_safetensors,
                               random_tensors, read, split_safetensors, write, write_gguf)
from fuzz_file_helpers import adapters, gguf_file, hf_checkpoint  # noqa: F401 (fixtures)
from fuzz_helpers import corrupted, fuzz, json_file, outcome, snapshot


SHAPES = st.one_of(st.lists(st.sampled_from((0, 1, 2, 3, 8, 48, -1) + HUGE), max_size=3),
                   st.sampled_from([None, 'x', {}]))
DTYPES = st.sampled_from(['F32', 'F16', 'BF16', 'F64', 'I64', 'I8', 'U8', 'BOOL', 'F8_E4M3',
                          'C64', 'X', '', None, 7])
OFFSETS = st.one_of(st.lists(st.one_of(st.integers(-2, 4000), st.sampled_from(HUGE)), max_size=3),
                    st.sampled_from([None, 'x']))


@st.composite
def safetensors_file(draw, data: bytes) -> bytes:
  """`data` (a safetensors file) with its header edited (a tensor's shape, dtype or offsets,
  a tensor dropped or renamed, the metadata), its length prefix wrong, or its bytes corrupted."""
  header, body = split_safetensors(data)
  kind = draw(st.sampled_from(('header', 'header', 'header', 'huge', 'length', 'bytes')))
  if kind == 'bytes':
    return draw(corrupted(data))
  if kind == 'length':
    return join_safetensors(header, body, draw(st.sampled_from((0, 1, 7, 9, 10**8) + HUGE)))
  names = sorted(name for name in header if name != '__metadata__')
  if kind == 'huge':  # a tensor of 2**40 elements whose offsets say so too
    header[draw(st.sampled_from(names))] = {'dtype': 'F32', 'shape': [2**40],
                                             'data_offsets': [0, 4 * 2**40]}
    return join_safetensors(header, body)
  for _ in range(draw(st.integers(1, 3))):
    name = draw(st.sampled_from(names))
    edit = draw(st.sampled_from(('shape', 'dtype', 'data_offsets', 'drop', 'rename', 'metadata')))
    if edit == 'drop':
      header.pop(name, None)
    elif edit == 'rename' and name in header:
      header[draw(st.text(max_size=6))] = header.pop(name)
    elif edit == 'metadata':
      header['__metadata__'] = draw(st.one_of(st.dictionaries(st.text(max_size=3),
                                                              st.text(max_size=3)), OFFSETS))
    elif name in header:
      header[name][edit] = draw({'shape': SHAPES, 'dtype': DTYPES, 'data_offsets': OFFSETS}[edit])
  return join_safetensors(header, body)


def load_damaged_adapter(folder: str, damage) -> None:
  """Loads a copy of the adapter `folder` after `damage(config_file, weights_file)`."""
  with tempfile.TemporaryDirectory() as directory:
    shutil.copytree(folder, directory, dirs_exist_ok=True)
    files = sorted(os.listdir(directory))
    damage(os.path.join(directory, next(f for f in files if f.endswith('.json'))),
           os.path.join(directory, next(f for f in files if f.endswith('.safetensors'))))
    before = snapshot(directory)
    loaded = outcome(lambda: load_adapter(directory, TINY), (AdapterFileError,), directory)
    assert snapshot(directory) == before
  if not isinstance(loaded, AdapterFileError):
    methods, peft = loaded  # every leaf the methods build on TINY, of its shape
    assert ({leaf: array.shape for leaf, array in flat_leaves(methods, peft).items()} ==
            leaf_shapes(methods, TINY))


@pytest.mark.parametrize('name', sorted(ADAPTERS))
@fuzz(60)
@given(data=st.data())
def test_an_adapter_with_a_damaged_config_loads_or_names_its_file(adapters, name, data):
  def damage(config_file, weights_file):
    write(config_file, data.draw(json_file(json.loads(read(config_file))), label='config'))
  load_damaged_adapter(adapters[name], damage)


@pytest.mark.parametrize('name', sorted(ADAPTERS))
@fuzz(80)
@given(data=st.data())
def test_an_adapter_with_damaged_weights_loads_or_names_its_file(adapters, name, data):
  def damage(config_file, weights_file):
    if data.draw(st.integers(0, 9), label='missing') == 0:
      os.remove(weights_file)
    else:
      write(weights_file, data.draw(safetensors_file(read(weights_file)), label='weights'))
  load_damaged_adapter(adapters[name], damage)


@fuzz(250)
@given(data=st.data())
def test_an_hf_checkpoint_loads_or_names_its_file(hf_checkpoint, data):
  with tempfile.TemporaryDirectory() as directory:
    shutil.copytree(hf_checkpoint, directory, dirs_exist_ok=True)
    config_file = os.path.join(directory, 'config.json')
    weights_file = os.path.join(directory, 'model.safetensors')
    damaged = data.draw(st.sampled_from(('config', 'weights', 'weights', 'both')), label='damaged')
    if damaged in ('config', 'both'):
      write(config_file, data.draw(json_file(json.loads(read(config_file))), label='config'))
    if damaged in ('weights', 'both'):
      write(weights_file, data.draw(safetensors_file(read(weights_file)), label='weights'))
    before = snapshot(directory)
    loaded = outcome(lambda: aj.load_model(directory), BASE_ERRORS, directory)
    assert snapshot(directory) == before
  if not isinstance(loaded, BASE_ERRORS):
    config, params = loaded
    assert params['embed_tokens']['embedding'].shape == (config.vocab_size, config.hidden_size)


@st.composite
def gguf_bytes(draw, data: bytes, data_offset: int, numbers: list[tuple[int, int]]) -> bytes:
  """`data` (a GGUF file) with its header (metadata and tensor infos) corrupted, one of its
  `numbers` (a count, a length, a dimension, a type) made huge or odd, or the whole file
  corrupted or cut short."""
  header, body = data[:data_offset], data[data_offset:]
  kind = draw(st.sampled_from(('header', 'header', 'number', 'number', 'number', 'bytes')))
  if kind == 'bytes':
    return draw(corrupted(data))
  if kind == 'header':
    return draw(corrupted(header)) + body
  header = bytearray(header)
  for _ in range(draw(st.integers(1, 3))):
    size = draw(st.sampled_from([4, 8]))
    at = draw(st.sampled_from([at for at, found in numbers if found == size]))
    if size == 8:
      header[at:at + 8] = struct.pack('<Q', draw(st.sampled_from((0, 1, 5) + HUGE)))
    else:
      header[at:at + 4] = struct.pack('<I', draw(st.sampled_from([0, 1, 5, 9, 31, 2**16,
                                                                  2**32 - 1])))
  return bytes(header) + body


# gguf adds a tensor's offset to the data's start in numpy: an offset near 2**64 wraps around
@pytest.mark.filterwarnings('ignore:overflow encountered in scalar add:RuntimeWarning')
@fuzz(400)
@given(data=st.data())
def test_a_gguf_file_loads_or_names_itself(gguf_file, data):
  good, data_offset, numbers = gguf_file
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, 'model.gguf')
    write(path, data.draw(gguf_bytes(read(good), data_offset, numbers), label='file'))
    loaded = outcome(lambda: aj.load_model(path), BASE_ERRORS, path)
    assert os.listdir(directory) == ['model.gguf']
  if not isinstance(loaded, BASE_ERRORS):
    config, params = loaded
    assert params['embed_tokens']['embedding'].shape == (config.vocab_size, config.hidden_size)


def damaged_copy(folder, tmp_path, file_name, edit):
  """A copy of `folder` with the JSON file `file_name` edited in place by `edit(value)`."""
  directory = tmp_path / 'damaged'
  shutil.copytree(folder, directory)
  value = json.loads((directory / file_name).read_text())
  edit(value)
  (directory / file_name).write_text(json.dumps(value))
  return str(directory)


@pytest.mark.parametrize('name, edit, message', [
    ('hf_lora', lambda c: c.update(peft_type=['LORA']), r"peft_type \['LORA'\] is not read here"),
    ('hf_lora', lambda c: c.update(target_modules=[['q_proj', 'v_proj']]),
     r"target_modules=\[\['q_proj', 'v_proj'\]\]; LoRA here targets a list of"),
    ('hf_ia3', lambda c: c.update(feedforward_modules=[['down_proj']]),
     r"target_modules=\['k_proj', 'v_proj', 'down_proj'\], "
     r"feedforward_modules=\[\['down_proj'\]\]; \(IA\)³ here scales exactly"),
    ('aj', lambda c: c.update(base_model='hidden_size'),
     r'"base_model" must be an object of the base\'s shape facts'),
    ('aj', lambda c: c['methods'][0].update(method='LoRA(rank=' + '-' * 3000 + '2)'),
     r'a "method" call nests too deeply to parse'),
], ids=['peft_type_list', 'lora_nested_targets', 'ia3_nested_targets', 'aj_base_model_text',
        'aj_nested_call'])
def test_an_adapter_config_of_the_wrong_json_type_names_its_file(adapters, tmp_path, name, edit,
                                                                 message):
  config_file = 'aj_adapter_config.json' if name == 'aj' else 'adapter_config.json'
  directory = damaged_copy(adapters[name], tmp_path, config_file, edit)
  with pytest.raises(AdapterFileError, match=f'{re.escape(config_file)}: {message}'):
    load_adapter(directory, TINY)


@pytest.mark.parametrize('changes, message', [
    ({'architectures': True}, r"not a Llama config \(TypeError: 'bool' object is not iterable\)"),
    ({'rope_theta': 10**400}, r'not a Llama config \(OverflowError: int too large to convert'),
], ids=['architectures', 'rope_theta'])
def test_an_hf_config_of_the_wrong_json_type_names_its_file(hf_checkpoint, tmp_path, changes,
                                                            message):
  directory = damaged_copy(hf_checkpoint, tmp_path, 'config.json', lambda c: c.update(changes))
  with pytest.raises(ConfigError, match=f'config.json: {message}'):
    aj.load_model(directory)


def test_a_gguf_tensor_of_another_shape_is_named_before_it_is_read(tmp_path):
  # 8 heads of 2 on SMALL's q_proj, [2 · 4, 8]: undoing llama.cpp's row permutation reshaped it
  # to [8, 0, 2, 8], a ValueError that named no file
  path = write_gguf(tmp_path / 'heads.gguf', SMALL.replace(num_heads=8, num_kv_heads=8, head_dim=2),
                    random_tensors(SMALL))
  with pytest.raises(ModelLoadError, match=r"heads\.gguf: tensor 'blk\.0\.attn_q\.weight' "
                                           r'\(model\.layers\.0\.self_attn\.q_proj\.weight\) has '
                                           r'shape \(8, 8\), the config implies \(16, 8\)'):
    aj.load_model(path)
