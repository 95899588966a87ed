"""Reads a llama.cpp GGUF file: metadata -> config, tensors -> dequantized params.

Every tensor type the `gguf` package can dequantize is read to float32 with its
own kernels; tests/test_gguf_types.py writes and reads back F32, F16, BF16, Q8_0,
Q5_0, Q5_1, Q4_0 and Q4_1 files (gguf-py has no quantizer for the K-quants, so
those are read but untested). llama.cpp's converter permutes
the rows of the q and k projections so that rotary pairs are interleaved
(`reshape(heads, 2, H/2, D).swapaxes(1, 2)`); we undo that to get back the
half-split layout of `transformers` that our rotary code uses.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import numpy as np

from additive_jax.model.config import ConfigError, LlamaConfig
from additive_jax.model.convert import ModelLoadError, hf_tensor_shapes, our_path, params_from_hf
from additive_jax.model.quant import QuantizedWeight
from additive_jax.model.quant_layout import GGUF_FORMATS, Layout

if TYPE_CHECKING:
  import gguf

_GLOBAL_NAMES = {'token_embd.weight': 'model.embed_tokens.weight',
                 'output_norm.weight': 'model.norm.weight',
                 'output.weight': 'lm_head.weight'}
_LAYER_NAMES = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
                'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
                'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
                'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj'}


def open_gguf(path: str) -> gguf.GGUFReader:
  """The parsed file (read-only, memory-mapped). Parsing SmolLM2's 49k-entry vocabulary takes
  seconds and a run reads the file three times (config, tokenizer, weights), so the reader is
  kept for a file whose size and modification time have not changed."""
  stat = os.stat(path)
  return _read_gguf(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_gguf(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
  del size, mtime_ns  # part of the cache key only
  try:
    return _bounded_reader()(path)
  except Exception as err:  # truncated or corrupt: numpy/struct errors of all kinds
    raise ModelLoadError(f'{path}: not a readable GGUF file ({type(err).__name__}: {err})') from None


@functools.cache
def _bounded_reader() -> type[gguf.GGUFReader]:
  """gguf's reader, refusing to read past the end of the file.

  gguf's own clips such a read to what the file holds, so a header whose array claims 2**40
  entries is read entry by entry, each empty past the end, each appended to a list: a loop
  that fills the memory. Refused, every count a header claims is bounded by the file's size.
  """
  import gguf  # here, not at the top: only GGUF files need it, and HF-only machines may lack it

  class BoundedReader(gguf.GGUFReader):
    # gguf's private reader of every number, string and array (gguf 0.17 to 0.19); a release
    # that renames it fails tests/test_fuzz_files.py, which loads a count of 2**40 in a child
    def _get(self, offset, dtype, count=1, override_order=None):
      end = offset + np.dtype(dtype).itemsize * int(count)
      if end > len(self.data):
        raise ValueError(f'a read of {int(count)} × {np.dtype(dtype).name} at byte {offset} runs '
                         f'past the end of the file ({len(self.data)} bytes)')
      return super()._get(offset, dtype, count, override_order)

  return BoundedReader


def metadata(reader: gguf.GGUFReader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _hf_name(gguf_name: str) -> str | None:
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split('.')
  if len(parts) == 4 and parts[0] == 'blk' and parts[2] in _LAYER_NAMES:
    return f'model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}'
  return None


def config_from_gguf(reader: gguf.GGUFReader, path: str, **overrides) -> LlamaConfig:
  arch = metadata(reader, 'general.architecture')
  if arch != 'llama':
    raise ConfigError(f'{path}: unsupported architecture {arch!r}; supported: llama')
  tensor_names = {t.name for t in reader.tensors}
  if 'rope_freqs.weight' in tensor_names:
    raise ConfigError(f'{path}: stores llama3 rope scaling as rope_freqs.weight, which is not '
                      'supported; load the HF checkpoint directory instead')

  def field(key, kind, default=None):
    """Metadata `llama.<key>` as a `kind`, or `default` when absent; errors name the field."""
    value = metadata(reader, f'llama.{key}', default)
    if value is None:
      raise ConfigError(f"{path}: metadata field 'llama.{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
      raise ConfigError(f"{path}: metadata field 'llama.{key}' must be {kind.__name__}, "
                        f'got {value!r}')
    return kind(value)

  tokens = reader.fields.get('tokenizer.ggml.tokens')  # files without llama.vocab_size
  heads = field('attention.head_count', int)
  hf = {'vocab_size': field('vocab_size', int, len(tokens.data) if tokens else None),
        'hidden_size': field('embedding_length', int),
        'intermediate_size': field('feed_forward_length', int),
        'num_hidden_layers': field('block_count', int), 'num_attention_heads': heads,
        'num_key_value_heads': field('attention.head_count_kv', int, heads),
        'rope_theta': field('rope.freq_base', float, 10000.0),
        'rms_norm_eps': field('attention.layer_norm_rms_epsilon', float),
        'max_position_embeddings': field('context_length', int, 2048),
        'tie_word_embeddings': 'output.weight' not in tensor_names}
  if metadata(reader, 'llama.attention.key_length') is not None:  # else hidden / heads
    hf['head_dim'] = field('attention.key_length', int)
  scaling = metadata(reader, 'llama.rope.scaling.type', 'none')
  if scaling == 'linear':
    hf['rope_scaling'] = {'rope_type': 'linear', 'factor': field('rope.scaling.factor', float)}
  elif scaling != 'none':
    raise ConfigError(f"{path}: metadata field 'llama.rope.scaling.type' is {scaling!r}; "
                      "supported: none, linear")
  try:
    return LlamaConfig.from_hf(hf, **overrides)
  except ConfigError as err:
    raise ConfigError(f'{path}: {err}') from None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation (rows = heads · H)."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader: gguf.GGUFReader) -> dict:
  """HF name -> the file's tensor, for the tensors we read."""
  return {name: tensor for tensor in reader.tensors if (name := _hf_name(tensor.name)) is not None}


def tensor_types(reader: gguf.GGUFReader, cfg: LlamaConfig) -> dict[tuple[str, ...], list[str]]:
  """Our weight path -> the GGUF types its tensors have (one per layer): what `base_quant='gguf'`
  keeps as blocks (model/quant_layout.py)."""
  types = {}
  for name, tensor in _tensors(reader).items():
    if (path := our_path(cfg, name)) is not None:
      types.setdefault(path, []).append(tensor.tensor_type.name)
  return types


def _blocks(tensor, shape, format: str, dtype: str) -> QuantizedWeight:
  """A Q8_0 / Q4_0 / Q4_1 tensor's bytes as blocks in the HF layout [out, in], not widened:
  a block is an fp16 d (and an fp16 m for Q4_1), then 32 int8 codes or 16 bytes of nibbles."""
  raw = np.asarray(tensor.data).view(np.uint8).reshape(shape[0], shape[1] // 32, -1)
  scale = np.ascontiguousarray(raw[..., 0:2]).view(np.float16)
  offset = np.ascontiguousarray(raw[..., 2:4]).view(np.float16) if format == 'int4_min' else None
  codes = np.ascontiguousarray(raw[..., 4 if offset is not None else 2:])
  return QuantizedWeight(codes.view(np.int8) if format == 'int8' else codes, scale, offset,
                         format, -1, dtype)


def load_gguf(path: str, layout: Layout | None = None, **overrides):
  """(config, params) from a GGUF file of a llama model. With `layout` the weights it names are
  quantized as they are read, or, for `layout.mode == 'gguf'`, kept in the file's blocks."""
  from gguf.quants import dequantize  # see _read_gguf
  reader = open_gguf(path)
  cfg = config_from_gguf(reader, path, **overrides)
  tensors = _tensors(reader)
  if cfg.num_layers > len(reader.tensors):  # before anything loops over the layers it claims
    raise ModelLoadError(f'{path}: the metadata says {cfg.num_layers} layers, and the file holds '
                         f'{len(reader.tensors)} tensors')
  expected = hf_tensor_shapes(cfg)

  def read(name):
    tensor = tensors[name]  # KeyError -> "missing"
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if shape != expected[name]:  # refused before dequantizing: nothing of its size is allocated
      raise ModelLoadError(f'{path}: tensor {tensor.name!r} ({name}) has shape {shape}, the config '
                           f'implies {expected[name]}')
    if layout is not None and layout.mode == 'gguf' and layout.format(our_path(cfg, name)):
      values = _blocks(tensor, shape, GGUF_FORMATS[tensor.tensor_type.name], layout.dtype)
    else:
      values = widen(tensor, shape)
    if name.endswith('q_proj.weight'):  # whole rows move: a row's blocks move with it
      values = _unpermute_rows(values, cfg.num_heads)
    elif name.endswith('k_proj.weight'):
      values = _unpermute_rows(values, cfg.num_kv_heads)
    return values

  def widen(tensor, shape):
    try:
      values = dequantize(tensor.data, tensor.tensor_type)
      values = values.reshape(shape)
    except (NotImplementedError, ValueError) as err:
      raise ModelLoadError(f'{path}: tensor {tensor.name!r} ({tensor.tensor_type.name}) cannot be '
                            f'dequantized ({err})') from None
    return values.astype(np.float32)

  return cfg, params_from_hf(cfg, read, path, layout)


def _unpermute_rows(w, heads: int):
  """`_unpermute` of an array, or of each part of a weight in blocks (rows first in all)."""
  if isinstance(w, QuantizedWeight):
    return w.replace(codes=_unpermute(w.codes, heads), scale=_unpermute(w.scale, heads),
                     offset=None if w.offset is None else _unpermute(w.offset, heads))
  return _unpermute(w, heads)
