"""Fuzzed files: adapter files of the three formats through `aj.peft.load_adapter`, and base
checkpoints (an HF directory of safetensors, a GGUF file) through `aj.load_model`, each with a
corrupted config, a corrupted header, wrong shapes, missing tensors or random bytes.

The property: a result, or the documented error naming the file: `AdapterFileError` for an
adapter (peft/files/file_io.py), `ConfigError` or `ModelLoadError` for a base
(model/config.py, model/convert.py). Anything else escaping (a KeyError, a TypeError of an
unhashable JSON value, a struct or numpy error) is a bug. Loading only reads: the folder is the
same after, bit for bit.

Memory: a header that claims a huge tensor is refused before anything of its size is
allocated. A child process loads such files with its data segment limited to 1 GiB above what
it holds after its imports (RLIMIT_DATA: every allocation counts, a file mapped read-only does
not, so a sparse file of many GiB may be mapped), and must get the error, fast.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import gguf
from hypothesis import given
from hypothesis import strategies as st
import numpy as np
import pytest
import safetensors.numpy

import additive_jax as aj
from additive_jax.model.config import ConfigError, LlamaConfig
from additive_jax.model.convert import ModelLoadError, config_to_hf, hf_tensor_shapes
from additive_jax.peft import IA3, Bottleneck, LoRA, PrefixTuning, PromptTuning
from additive_jax.peft.count import leaf_shapes
from additive_jax.peft.files import AdapterFileError, load_adapter, save_adapter
from additive_jax.peft.files.aj_format import BASE_FACTS, flat_leaves
from adapter_files_helpers import random_peft
from conftest import TINY
from fuzz_helpers import corrupted, fuzz, json_file, outcome, snapshot

# One adapter of each kind each format holds, saved for TINY.
ADAPTERS = {'aj': ((LoRA(rank=2), Bottleneck(dim=4)), 'aj'),
            'hf_lora': ((LoRA(rank=2),), 'hf_peft'), 'hf_ia3': ((IA3(),), 'hf_peft'),
            'hf_prompt': ((PromptTuning(3),), 'hf_peft'),
            'hf_prefix': ((PrefixTuning(3),), 'hf_peft'),
            'adapterhub': ((Bottleneck(dim=4),), 'adapterhub')}
# A base small enough that a corruption often lands in a header.
SMALL = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=4)
BASE_ERRORS = (ConfigError, ModelLoadError)
HUGE = (2**31, 2**32, 2**40, 2**63, 2**64 - 1)


@pytest.fixture(scope='module')
def adapters(tmp_path_factory):
  folders = {}
  for name, (methods, file_format) in ADAPTERS.items():
    folders[name] = str(tmp_path_factory.mktemp(name))
    save_adapter(folders[name], methods, random_peft(methods, TINY), TINY, format=file_format)
  return folders


def random_tensors(config) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(0)
  return {name: rng.randn(*shape).astype(np.float32)
          for name, shape in hf_tensor_shapes(config).items()}


@pytest.fixture(scope='module')
def hf_checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf')
  (directory / 'config.json').write_text(json.dumps(config_to_hf(SMALL)))
  safetensors.numpy.save_file(random_tensors(SMALL), str(directory / 'model.safetensors'))
  return str(directory)


def write_gguf(path, config, tensors=None, arrays=None, claims=None, sparse=False) -> str:
  """A llama GGUF file with `config`'s metadata and the `arrays` (key -> (values, GGUF type of
  each value)), holding the HF-named F32 `tensors` under llama.cpp's names, or only the header of
  the `claims` (HF name -> shape): the file ends there, or, `sparse`, runs on as far as they
  claim, unwritten (a sparse file)."""
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_vocab_size(config.vocab_size)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_block_count(config.num_layers)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  for key, (values, value_type) in (arrays or {}).items():
    writer.add_key_value(key, values, gguf.GGUFValueType.ARRAY, value_type)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
  gguf_name = lambda name: names.get_name(name, try_suffixes=('.weight',))
  for name, tensor in (tensors or {}).items():
    writer.add_tensor(gguf_name(name), tensor)
  claimed = 0
  for name, shape in (claims or {}).items():
    size = 4 * int(np.prod(shape, dtype=object))
    writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), size)
    claimed += size
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  if claims:
    writer.write_ti_data_to_file()
  else:
    writer.write_tensors_to_file()
  writer.close()
  if sparse:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) + 64 + claimed)
  return str(path)


@pytest.fixture(scope='module')
def gguf_file(tmp_path_factory):
  # arrays of strings and of bytes: a count made huge must not be read entry by entry
  arrays = {'tokenizer.ggml.tokens': ([chr(97 + i) for i in range(SMALL.vocab_size)],
                                      gguf.GGUFValueType.STRING),
            'fuzz.bytes': ([1, 2, 3], gguf.GGUFValueType.UINT8)}
  path = write_gguf(tmp_path_factory.mktemp('gguf') / 'small.gguf', SMALL, random_tensors(SMALL),
                    arrays)
  return path, gguf.GGUFReader(path).data_offset, header_numbers(path)


def header_numbers(path: str) -> list[tuple[int, int]]:
  """(byte offset, size) of each unsigned number of the file's header: the u64 lengths, counts,
  dimensions and data offsets, the u32 types, dimension counts and values."""
  reader = gguf.GGUFReader(path)
  start = reader.data.__array_interface__['data'][0]
  numbers = []
  for field in [*reader.fields.values(), *(tensor.field for tensor in reader.tensors)]:
    for part in field.parts:
      if part.dtype.kind == 'u' and part.dtype.itemsize in (4, 8):
        at = part.__array_interface__['data'][0] - start
        numbers += [(at + i * part.dtype.itemsize, part.dtype.itemsize) for i in range(part.size)]
  return numbers


# safetensors: 8 bytes of header length (little-endian), the JSON header, the tensors' bytes.

def split_safetensors(data: bytes) -> tuple[dict, bytes]:
  length = struct.unpack('<Q', data[:8])[0]
  return json.loads(data[8:8 + length]), data[8 + length:]


def join_safetensors(header: dict, body: bytes, length: int | None = None) -> bytes:
  text = json.dumps(header).encode()
  return struct.pack('<Q', len(text) if length is None else length) + text + body


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


def read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def write(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


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


# Memory: files whose headers claim tensors of 2 GiB to 4 TiB, loaded in a child process that may
# allocate 1 GiB at most (RLIMIT_DATA). Each must be refused with the documented error, fast.

CHILD = r'''
import json, resource, signal, sys, time
import jax.numpy
import additive_jax as aj
from additive_jax.peft.files import load_adapter
jax.numpy.zeros(1).block_until_ready()  # the CPU backend's own memory comes before the limit

with open('/proc/self/status') as f:
  held = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmData:'))
resource.setrlimit(resource.RLIMIT_DATA, (held + 2**30, held + 2**30))


class Hang(BaseException):  # not an Exception: a loader's `except Exception` lets it through
  pass


def hang(signum, frame):
  raise Hang


signal.signal(signal.SIGALRM, hang)
for case, kind, path, base in json.loads(sys.argv[1]):
  start = time.perf_counter()
  signal.alarm(10)
  try:
    load_adapter(path, aj.LlamaConfig(**base)) if kind == 'adapter' else aj.load_model(path)
    error = None
  except Exception as err:
    error = f'{type(err).__name__}: {err}'
  except Hang:
    error = 'Hang: still loading after 10 s'
  signal.alarm(0)
  print(json.dumps([case, error, time.perf_counter() - start]), flush=True)
'''


def huge_safetensors(path, name, shape, length=None, sparse=False) -> None:
  """A safetensors file whose header declares one F32 tensor `name` of `shape` (and its bytes):
  the file ends after 16 bytes of data, or, `sparse`, runs on as far as the header says."""
  size = 4 * int(np.prod(shape, dtype=object))
  write(path, join_safetensors({name: {'dtype': 'F32', 'shape': list(shape),
                                       'data_offsets': [0, size]}}, b'\0' * 16, length))
  if sparse:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) - 16 + size)


def test_a_header_claiming_huge_tensors_is_refused_before_allocating(tmp_path, adapters):
  def hf_directory(case, **claim):
    directory = tmp_path / case
    directory.mkdir()
    (directory / 'config.json').write_text(json.dumps(config_to_hf(SMALL)))
    huge_safetensors(str(directory / 'model.safetensors'), 'model.embed_tokens.weight', **claim)
    return 'model', str(directory), None

  def lora_directory(case, **claim):
    directory = tmp_path / case
    shutil.copytree(adapters['hf_lora'], directory)
    huge_safetensors(str(directory / 'adapter_model.safetensors'),
                     'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', **claim)
    return 'adapter', str(directory), {fact: getattr(TINY, fact) for fact in BASE_FACTS}

  def gguf_path(case, **written):
    return 'model', write_gguf(tmp_path / f'{case}.gguf', SMALL, **written), None

  byte_count = {'fuzz.bytes': ([1, 2, 3], gguf.GGUFValueType.UINT8)}
  cases = {  # case -> (kind, path, base) and the error it must get
      'hf_2**40_elements': (hf_directory('hf_2**40_elements', shape=(2**40,)),
                            r'ModelLoadError: .*model\.safetensors: not a readable safetensors'),
      'hf_2GiB_sparse': (hf_directory('hf_2GiB_sparse', shape=(2**28, 2), sparse=True),
                         r"ModelLoadError: .*model\.safetensors: tensor "
                         r"'model\.embed_tokens\.weight' has shape \(268435456, 2\), the config "
                         r'implies \(11, 8\)'),
      'gguf_2**40_elements': (gguf_path('gguf_2**40_elements',
                                        claims={'model.embed_tokens.weight': (2**20, 2**20)}),
                              r'ModelLoadError: .*not a readable GGUF file \(ValueError: a read of '
                              r'1099511627776 × float32 at byte \d+ runs past the end of the '
                              r'file'),
      'gguf_2GiB_sparse': (gguf_path('gguf_2GiB_sparse', sparse=True,
                                     claims={'model.embed_tokens.weight': (2**26, 8)}),
                           r"ModelLoadError: .*tensor 'token_embd\.weight' \(model\.embed_tokens\."
                           r'weight\) has shape \(67108864, 8\), the config implies \(11, 8\)'),
      'gguf_array_of_2**40': (gguf_path('gguf_array_of_2**40', arrays=byte_count,
                                        tensors=random_tensors(SMALL)),
                              r'ModelLoadError: .*not a readable GGUF file \(ValueError: a read of '
                              r'1 × uint8 at byte \d+ runs past the end of the file'),
      'adapter_2**40_elements': (lora_directory('adapter_2**40_elements', shape=(2**40,)),
                                 r'AdapterFileError: .*adapter_model\.safetensors: not a readable '
                                 r'safetensors file'),
      'adapter_header_of_2**63_bytes': (lora_directory('adapter_header_of_2**63_bytes', shape=(2,),
                                                       length=2**63),
                                        r'AdapterFileError: .*not a readable safetensors file'),
  }
  # the array's count, 3, claims 2**40 bytes instead
  path = cases['gguf_array_of_2**40'][0][1]
  data = bytearray(read(path))
  at = data.index(b'fuzz.bytes') + len(b'fuzz.bytes') + 8  # after the value type and item type
  assert struct.unpack('<Q', data[at:at + 8]) == (3,)
  write(path, bytes(data[:at]) + struct.pack('<Q', 2**40) + bytes(data[at + 8:]))

  listed = [[case, *where] for case, (where, _) in cases.items()]
  child = subprocess.run([sys.executable, '-c', CHILD, json.dumps(listed)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert child.returncode == 0, child.stderr[-3000:]
  results = {case: (error, seconds) for case, error, seconds in map(json.loads,
                                                                    child.stdout.splitlines())}
  assert results.keys() == cases.keys(), child.stderr[-3000:]
  for case, (_, pattern) in cases.items():
    error, seconds = results[case]
    assert error is not None and re.fullmatch(pattern + '.*', error, re.DOTALL), (case, error)
    assert seconds < 5, (case, seconds)


# Regressions: what the fuzzing found, one input each.

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
