"""Shared by the fuzz tests of files: one adapter of each kind each format holds, a small base
as an HF checkpoint and a GGUF file, and writers of raw safetensors and GGUF bytes."""

import json
import os
import struct

import gguf
import numpy as np
import pytest
import safetensors.numpy

from additive_jax.model.config import ConfigError, LlamaConfig
from additive_jax.model.convert import ModelLoadError, config_to_hf, hf_tensor_shapes
from additive_jax.peft import IA3, Bottleneck, LoRA, PrefixTuning, PromptTuning
from additive_jax.peft.files import save_adapter
from adapter_files_helpers import random_peft
from conftest import TINY

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


def read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def write(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)
