"""Reads a llama.cpp GGUF file: metadata -> config, tensors -> dequantized params.

Quantized tensors (Q4_0, Q4_1, Q8_0, the K-quants, ...) are dequantized to
float32 with the `gguf` package's own kernels. llama.cpp's converter permutes
the rows of the q and k projections so that rotary pairs are interleaved
(`reshape(heads, 2, H/2, D).swapaxes(1, 2)`); we undo that to get back the
half-split layout of `transformers` that our rotary code uses.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from additive_jax.model.config import ConfigError, LlamaConfig
from additive_jax.model.convert import CheckpointError, params_from_hf

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
  import gguf  # here, not at the top: only GGUF files need it, and HF-only machines may lack it
  try:
    return gguf.GGUFReader(path)
  except Exception as err:  # truncated or corrupt: numpy/struct errors of all kinds
    raise CheckpointError(f'{path}: not a readable GGUF file ({type(err).__name__}: {err})') from None


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

  def need(key):
    value = metadata(reader, f'llama.{key}')
    if value is None:
      raise ConfigError(f'{path}: metadata field llama.{key!r} is missing')
    return value

  hidden, heads = int(need('embedding_length')), int(need('attention.head_count'))
  vocab = metadata(reader, 'llama.vocab_size') or len(metadata(reader, 'tokenizer.ggml.tokens', []))
  hf = {'vocab_size': int(vocab), 'hidden_size': hidden,
        'intermediate_size': int(need('feed_forward_length')),
        'num_hidden_layers': int(need('block_count')), 'num_attention_heads': heads,
        'num_key_value_heads': int(metadata(reader, 'llama.attention.head_count_kv', heads)),
        'head_dim': int(metadata(reader, 'llama.attention.key_length', hidden // heads)),
        'rope_theta': float(metadata(reader, 'llama.rope.freq_base', 10000.0)),
        'rms_norm_eps': float(need('attention.layer_norm_rms_epsilon')),
        'max_position_embeddings': int(metadata(reader, 'llama.context_length', 2048)),
        'tie_word_embeddings': 'output.weight' not in tensor_names}
  if metadata(reader, 'llama.rope.scaling.type') == 'linear':
    hf['rope_scaling'] = {'rope_type': 'linear',
                          'factor': float(metadata(reader, 'llama.rope.scaling.factor'))}
  try:
    return LlamaConfig.from_hf(hf, **overrides)
  except ConfigError as err:
    raise ConfigError(f'{path}: {err}') from None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation (rows = heads · H)."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, **overrides):
  """(config, params) from a GGUF file of a llama model."""
  from gguf.quants import dequantize  # see _read_gguf
  reader = open_gguf(path)
  cfg = config_from_gguf(reader, path, **overrides)
  tensors = {}
  for tensor in reader.tensors:
    name = _hf_name(tensor.name)
    if name is not None:
      tensors[name] = tensor

  def read(name):
    tensor = tensors[name]  # KeyError -> "missing"
    try:
      values = dequantize(tensor.data, tensor.tensor_type)
      values = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))
    except (NotImplementedError, ValueError) as err:
      raise CheckpointError(f'{path}: tensor {tensor.name!r} ({tensor.tensor_type.name}) cannot be '
                            f'dequantized ({err})') from None
    if name.endswith('q_proj.weight'):
      values = _unpermute(values, cfg.num_heads)
    elif name.endswith('k_proj.weight'):
      values = _unpermute(values, cfg.num_kv_heads)
    return values.astype(np.float32)

  return cfg, params_from_hf(cfg, read, path)
