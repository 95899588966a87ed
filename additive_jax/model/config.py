"""The Llama architecture hyper-parameters, read from a Hugging Face `config.json`.

`LlamaConfig.from_hf(dict)` accepts both the transformers 4 form (`rope_theta`
and `rope_scaling` at the top level) and the transformers 5 form
(`rope_parameters`), checks every field it uses, and names the offending key
when one is missing or has the wrong type, so that a bad file fails before any
weight is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = ('LlamaForCausalLM',)
# The keys each rope type must give, as transformers' `_validate_<type>_rope_parameters`
# requires them (rope_theta may come from the top level, as transformers fills it in).
ROPE_KEYS = {'default': (),
             'linear': ('factor',),
             'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                        'original_max_position_embeddings')}
SUPPORTED_ROPE_TYPES = tuple(ROPE_KEYS)
# jax.checkpoint of each block -> its policy: nothing recomputed ('none': no checkpoint),
# everything recomputed, the matmul outputs kept
# How attention is computed; 'auto' takes the backend's best (model/attention.py: resolve).
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash', 'pallas')
REMAT_POLICIES = {'none': None, 'full': None,
                  'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}
# the names a config gives a dtype (compute and storage)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype_name(name: str, backend: str | None = None) -> str:
  """A config's compute dtype by name; 'auto' is bfloat16 on a GPU or TPU (their products'
  fast path) and float32 on a CPU (XLA:CPU widens bf16 operands to fp32 for its products, so
  bf16 buys nothing there but rounding)."""
  if name != 'auto':
    return name
  return 'bfloat16' if (backend or jax.default_backend()) in ('gpu', 'tpu') else 'float32'


class ConfigError(ValueError):
  """A model configuration that cannot describe a supported Llama."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """`rope_scaling` of transformers: 'linear' divides positions by `factor`;
  'llama3' rescales the low frequencies (Llama 3.1 long-context recipe)."""
  rope_type: str = 'default'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(f'rope type {self.rope_type!r} is not supported '
                        f'(supported: {", ".join(SUPPORTED_ROPE_TYPES)})')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int          # D
  intermediate_size: int    # F
  num_layers: int           # L
  num_heads: int            # N
  num_kv_heads: int         # K
  head_dim: int             # H
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  max_position_embeddings: int = 2048
  dtype: Any = jnp.float32        # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype of the frozen base
  remat: str = 'none'             # 'none' | 'full' | 'dots' (jax.checkpoint policy)
  attention: str = 'auto'         # ATTENTION_IMPLEMENTATIONS (model/attention.py)

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers',
                 'num_heads', 'num_kv_heads', 'head_dim'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f'{name} must be a positive integer, got {value!r}')
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f'num_attention_heads={self.num_heads} is not a multiple of '
                        f'num_key_value_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ConfigError(f'head_dim={self.head_dim} must be even for rotary embeddings')
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f'remat must be one of {", ".join(REMAT_POLICIES)}, got {self.remat!r}')
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(f'attention must be one of {", ".join(ATTENTION_IMPLEMENTATIONS)}, '
                        f'got {self.attention!r}')

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)

  @property
  def num_base_params(self) -> int:
    """Parameters of the frozen base, from the shapes alone."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.attention_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads) + d
    mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
    per_layer = attn + mlp + 2 * d
    heads = 1 if self.tie_word_embeddings else 2
    return self.num_layers * per_layer + heads * self.vocab_size * d + d

  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> LlamaConfig:
    """Builds the config from a transformers `LlamaConfig` dict (v4 or v5 form)."""
    if not isinstance(hf, dict):
      raise ConfigError(f'config must be a JSON object, got {type(hf).__name__}')
    architectures = hf.get('architectures') or ['LlamaForCausalLM']
    unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
    if unsupported or hf.get('model_type', 'llama') != 'llama':
      raise ConfigError(
          f'unsupported architecture {unsupported or hf.get("model_type")!r} '
          f'(model_type={hf.get("model_type")!r}); supported: {", ".join(SUPPORTED_ARCHITECTURES)}')
    if hf.get('hidden_act', 'silu') != 'silu':
      raise ConfigError(f"hidden_act must be 'silu' for a Llama, got {hf['hidden_act']!r}")

    heads = _field(hf, 'num_attention_heads', int)
    hidden = _field(hf, 'hidden_size', int)
    if heads <= 0:  # checked here because the default head_dim divides by it
      raise ConfigError(f"config field 'num_attention_heads' must be positive, got {heads}")
    return cls(
        vocab_size=_field(hf, 'vocab_size', int),
        hidden_size=hidden,
        intermediate_size=_field(hf, 'intermediate_size', int),
        num_layers=_field(hf, 'num_hidden_layers', int),
        num_heads=heads,
        num_kv_heads=_field(hf, 'num_key_value_heads', int, heads),
        head_dim=_field(hf, 'head_dim', int, hidden // heads),
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf),
        rms_norm_eps=_field(hf, 'rms_norm_eps', float, 1e-6),
        tie_word_embeddings=_field(hf, 'tie_word_embeddings', bool, False),
        attention_bias=_field(hf, 'attention_bias', bool, False),
        mlp_bias=_field(hf, 'mlp_bias', bool, False),
        max_position_embeddings=_field(hf, 'max_position_embeddings', int, 2048),
        **overrides)


def _field(table: dict[str, Any], key: str, kind: type, default=None, prefix: str = ''):
  """`table[key]` checked to be a `kind` (an int is a float too), or `default` when it is
  absent; the error names the field as `prefix + key`."""
  if table.get(key) is None:
    if default is None:
      raise ConfigError(f'config field {prefix + key!r} is missing')
    return default
  value = table[key]
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
    raise ConfigError(f'config field {prefix + key!r} must be {kind.__name__}, '
                      f'got {type(value).__name__} {value!r}')
  return value


def _rope_table(hf: dict[str, Any]) -> tuple[dict[str, Any], str]:
  """The rope settings and the prefix that names their fields: under `rope_parameters`
  (transformers 5) or `rope_scaling` (transformers 4); ({}, '') when there are none."""
  for key in ('rope_parameters', 'rope_scaling'):
    if hf.get(key):
      if not isinstance(hf[key], dict):
        raise ConfigError(f'config field {key!r} must be an object, got {hf[key]!r}')
      return hf[key], f'{key}.'
  return {}, ''


def _rope_theta(hf: dict[str, Any]) -> float:
  table, prefix = _rope_table(hf)
  if table.get('rope_theta') is not None:
    return _field(table, 'rope_theta', float, prefix=prefix)
  return _field(hf, 'rope_theta', float, 10000.0)


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling:
  table, prefix = _rope_table(hf)
  # Built first with the type alone, so that an unsupported type is refused before its keys.
  scaling = RopeScaling(rope_type=table.get('rope_type', table.get('type', 'default')))
  values = {key: _field(table, key, int if key == 'original_max_position_embeddings' else float,
                        prefix=prefix)
            for key in ROPE_KEYS[scaling.rope_type]}
  return dataclasses.replace(scaling, **values)
