"""Which base weights a quantized base keeps in blocks, and in which format (`base_quant`).

  mode   projections (q k v o, gate up down)   embedding and LM head   block (default)
  none   the checkpoint's dtype, widened       widened                 -
  int8   int8                                  int8                    32
  int4   int4 (d · (code − 8))                 int8                    32
  nf4    nf4                                   int8                    64 (QLoRA's)
  gguf   a GGUF file's Q8_0 / Q4_0 / Q4_1 blocks, byte for byte (others widened)   32

The embedding and the head stay at 8 bits under the 4-bit modes, as llama.cpp's 4-bit files keep
`token_embd` at Q8_0 (the embedded SmolLM2 file does) and bitsandbytes never quantizes them: a
tied head's 4-bit rounding moves every logit, where the projections' is spread over many
products. Norms and biases are never quantized (a few thousand values). Every other weight is
stored in blocks along its contraction axis (model/quant.py), the axis a product sums over, so a
block's scale is one factor of the sum and a GGUF row's blocks are ours unchanged.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from additive_jax.model.config import ConfigError, LlamaConfig
from additive_jax.model.quant import QuantizedWeight, codes_shape, quantize

MODES = ('none', 'int8', 'int4', 'nf4', 'gguf')
DEFAULT_BLOCK = {'int8': 32, 'int4': 32, 'nf4': 64, 'gguf': 32}
GGUF_FORMATS = {'Q8_0': 'int8', 'Q4_0': 'int4', 'Q4_1': 'int4_min'}
EMBEDDING = ('embed_tokens', 'embedding')
# each quantized weight's path in the params and its contraction axis, counted from the end
# (kernels are [in…, out…]: q/k/v [D, N|K, H], o [N, H, D] in blocks along H, MLP [D, F] / [F, D])
AXES = {EMBEDDING: -1, ('lm_head', 'kernel'): -2,
        **{('layers', 'self_attn', f'{p}_proj', 'kernel'): -3 for p in 'qkv'},
        ('layers', 'self_attn', 'o_proj', 'kernel'): -2,
        **{('layers', 'mlp', f'{p}_proj', 'kernel'): -2 for p in ('gate', 'up', 'down')}}


@dataclasses.dataclass(frozen=True)
class Layout:
  """The format of each weight kept in blocks (`formats`: (path, format) pairs), the block
  size, and the dtype the widened weights are computed in."""
  mode: str
  formats: tuple[tuple[tuple[str, ...], str], ...]
  block: int
  dtype: str

  def format(self, path: tuple[str, ...]) -> str | None:
    return dict(self.formats).get(tuple(path))


def _contraction_length(cfg: LlamaConfig, path) -> int:
  return {EMBEDDING: cfg.hidden_size, ('lm_head', 'kernel'): cfg.hidden_size,
          ('layers', 'self_attn', 'o_proj', 'kernel'): cfg.head_dim,
          ('layers', 'mlp', 'down_proj', 'kernel'): cfg.intermediate_size}.get(path, cfg.hidden_size)


def layout_for(cfg: LlamaConfig, mode: str, block: int = 0,
               gguf_types: dict | None = None) -> Layout | None:
  """The layout of `mode` for a model of `cfg` (None for 'none'). `gguf_types`: for 'gguf',
  {path: the GGUF types of that weight over the layers}; a weight whose layers disagree, or
  whose type is not one of `GGUF_FORMATS`, is widened as under 'none'."""
  if mode not in MODES:
    raise ConfigError(f'base_quant={mode!r}: one of {MODES}')
  if mode == 'none':
    return None
  paths = [path for path in AXES if path[0] != 'lm_head' or not cfg.tie_word_embeddings]
  if mode == 'gguf':
    if block not in (0, 32):
      raise ConfigError(f'base_quant_block={block}: a GGUF file\'s blocks are 32 long')
    formats = tuple((path, GGUF_FORMATS[types.pop()]) for path, types in
                    ((path, set((gguf_types or {}).get(path, ()))) for path in paths)
                    if len(types) == 1 and next(iter(types)) in GGUF_FORMATS)
  else:
    formats = tuple((path, mode if path[0] == 'layers' else 'int8') for path in paths)
  block = block or DEFAULT_BLOCK[mode]
  for path, format in formats:
    length = _contraction_length(cfg, path)
    if block < 2 or block % 2 or length % block:
      raise ConfigError(f'base_quant_block={block}: {"/".join(path)} sums over {length} values, '
                        f'which blocks of {block} do not split (an even divisor of {length})')
  return Layout(mode, formats, block, np.dtype(cfg.dtype).name)


def blocks_to_ours(w: QuantizedWeight, path, our_shape) -> QuantizedWeight:
  """A GGUF tensor's blocks, read in the HF layout [out, in] (axis −1), in our layout: kernels
  are the transpose, [in…, out…], so the blocks move with their rows and the codes are not
  touched; the embedding is [V, D] in both."""
  if path == EMBEDDING:
    return w
  codes, scale = codes_shape(our_shape, w.format, w.block, AXES[path])

  def move(x, shape):
    return None if x is None else np.ascontiguousarray(np.transpose(x, (1, 2, 0))).reshape(shape)
  return w.replace(codes=move(w.codes, codes), scale=move(w.scale, scale),
                   offset=move(w.offset, scale), axis=AXES[path])


def quantize_weight(layout: Layout | None, path, weight: np.ndarray):
  """`weight` (ours, one layer's or unstacked) in its format, or as it is."""
  format = layout.format(path) if layout else None
  if format is None:
    return weight
  return quantize(weight, format, layout.block, AXES[path], layout.dtype)


def quantize_params(params, layout: Layout | None):
  """Params in memory (ours, numpy or jax) with the layout's weights in blocks, on the host."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: quantize_weight(layout, tuple(k.key for k in path), np.asarray(x)), params)


def abstract_quantized(boxed_params, layout: Layout | None):
  """The base's abstract params (`nn.LogicallyPartitioned` shapes) with each weight of the
  layout as a `QuantizedWeight` of abstract codes and scales, named as the weight with the
  block axis unnamed: what shardings and memory plans are computed from."""
  if layout is None:
    return boxed_params

  def convert(path, box):
    path = tuple(k.key for k in path)
    format = layout.format(path)
    if format is None:
      return box
    axis = AXES[path]
    p = len(box.names) + axis
    names = box.names[:p + 1] + (None,) + box.names[p + 1:]
    codes, scale = codes_shape(box.value.shape, format, layout.block, axis)
    codes_dtype = np.int8 if format == 'int8' else np.uint8

    def abstract(shape, dtype):
      return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, dtype), names)
    return QuantizedWeight(abstract(codes, codes_dtype), abstract(scale, np.float16),
                           abstract(scale, np.float16) if format == 'int4_min' else None,
                           format, axis, layout.dtype)
  return jax.tree_util.tree_map_with_path(
      convert, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
