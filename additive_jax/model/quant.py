"""A frozen base weight stored in blocks of 8 or 4 bits, widened where a product reads it.

Along the weight's contraction axis, each block of b consecutive weights shares an fp16 scale d
(and, for int4_min, an fp16 offset m):

  format     code             w = …                  per block   bits per weight (b = 32 / 64)
  int8       int8, −127…127   d · code               d           8.5  / 8.25   GGUF Q8_0 at b = 32
  int4       4 bits, 0…15     d · (code − 8)         d           4.5  / 4.25   GGUF Q4_0 at b = 32
  int4_min   4 bits, 0…15     d · code + m           d, m        5    / 4.5    GGUF Q4_1 at b = 32
  nf4        4 bits, 0…15     d · NF4[code]          d = absmax  4.5  / 4.25   QLoRA (Dettmers et al.
                                                                               2023, arXiv:2305.14314)

Two 4-bit codes share a byte as llama.cpp packs them: byte j of a block holds code j in its low
nibble and code j + b/2 in its high one, so a GGUF file's blocks are kept byte for byte (the
quantizers below are gguf-py's, generalised to any even block size: bit-equal at b = 32, which
tests/test_quant.py checks) and the widening is gguf-py's arithmetic, in the same order.

Layout. A weight of logical shape S whose contraction axis is `axis` (negative: the same for a
layer's weight and for the layers stacked) stores `codes` of shape S[:a] + (S[a]/b, b or b/2) +
S[a+1:] and `scale` (and `offset`) of shape S[:a] + (S[a]/b, 1) + S[a+1:]: the blocks split
the contraction axis in two, so every other axis keeps its logical name (and its sharding).

`QuantizedWeight` is a flax `AxisMetadata` box: `self.param` in `nn.Dense`, `nn.DenseGeneral`
and `nn.Embed` unboxes it into the widened weight where the module reads it (in the scanned
block: one layer's weight at a time), so the model's code is the same for every format. The
widened weight is in the run's compute dtype; trainables and their optimizer state never see it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

FORMATS = ('int8', 'int4', 'int4_min', 'nf4')
# NormalFloat4: the 16 quantiles of N(0, 1) scaled to [−1, 1], with an exact 0 (QLoRA, appendix E;
# bitsandbytes' table)
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


class QuantizedWeight(flax.struct.PyTreeNode, meta.AxisMetadata):
  """One base weight in blocks (module docstring); `unbox()` is the widened weight."""
  codes: Any
  scale: Any
  offset: Any = None
  format: str = flax.struct.field(pytree_node=False, default='int8')
  axis: int = flax.struct.field(pytree_node=False, default=-1)
  dtype: str = flax.struct.field(pytree_node=False, default='float32')  # of the widened weight

  @property
  def block(self) -> int:
    return self.codes.shape[self.axis] * (1 if self.format == 'int8' else 2)

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape: the weight's, as the model declares it."""
    shape, p = list(self.codes.shape), len(self.codes.shape) + self.axis
    return tuple(shape[:p - 1] + [shape[p - 1] * self.block] + shape[p + 1:])

  @property
  def nbytes(self) -> int:
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
               for x in (self.codes, self.scale, self.offset) if x is not None)

  def unbox(self) -> jax.Array:
    return dequantize(self)

  def replace_boxed(self, val):
    raise TypeError('a quantized base weight is frozen: it cannot be replaced by a new value')

  def add_axis(self, index, params):  # the axis is counted from the end: stacking keeps it
    return self

  def remove_axis(self, index, params):
    return self


def dequantize(w: QuantizedWeight, dtype=None) -> jax.Array:
  """The widened weight, computed as gguf-py's `dequantize` computes it, in fp32, then cast to
  `dtype` (default: the weight's). Nothing of it is kept for a backward pass (`jax.checkpoint`:
  recomputed from the codes, the model's remat policy keeping matmul outputs alone)."""
  def widen(codes, scale, offset):
    if w.format != 'int8':  # low nibbles are the block's first half, high nibbles its second:
      # [.., b/2, ..] -> [.., 2, b/2, ..] by two shifts, then merged (a concatenation of the two
      # halves computes the same, 9x slower on XLA:CPU: it does not vectorize)
      p = codes.ndim + w.axis
      shifts = jnp.asarray([0, 4], codes.dtype).reshape((2,) + (1,) * (codes.ndim - p))
      codes = (jnp.expand_dims(codes, p) >> shifts) & 15
      codes = codes.reshape(codes.shape[:p] + (2 * codes.shape[p + 1],) + codes.shape[p + 2:])
    if w.format == 'int8':
      values = codes.astype(jnp.float32)
    elif w.format == 'int4':
      values = (codes.astype(jnp.int8) - 8).astype(jnp.float32)
    elif w.format == 'int4_min':
      values = codes.astype(jnp.float32)
    else:
      values = jnp.asarray(NF4)[codes]
    x = scale.astype(jnp.float32) * values
    if offset is not None:
      x = x + offset.astype(jnp.float32)
    return x.reshape(w.shape).astype(dtype or w.dtype)
  widen = jax.checkpoint(widen, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
  return widen(jnp.asarray(w.codes), jnp.asarray(w.scale),
               None if w.offset is None else jnp.asarray(w.offset))


def _round_away(x):
  """Round half away from zero, as llama.cpp's `roundf` (gguf-py's `np_roundf`)."""
  a = np.abs(x)
  floored = np.floor(a)
  return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def quantize(w: np.ndarray, format: str, block: int, axis: int, dtype='float32') -> QuantizedWeight:
  """`w` (numpy, any float dtype) in blocks of `block` along `axis` (negative), on the host."""
  w = np.asarray(w, np.float32)
  p = w.ndim + axis
  if w.shape[p] % block or (format != 'int8' and block % 2):
    raise ValueError(f'a weight of shape {w.shape} cannot be split into blocks of {block} along '
                     f'axis {p}')
  x = w.reshape(w.shape[:p] + (w.shape[p] // block, block) + w.shape[p + 1:])
  inner = p + 1
  offset = None
  with np.errstate(divide='ignore', invalid='ignore'):
    if format == 'int8':
      d = np.abs(x).max(axis=inner, keepdims=True) / 127
      codes = _round_away(x * np.where(d == 0, 0, 1 / d)).astype(np.int8)
    elif format == 'int4':  # the block's value of largest magnitude maps to code 0 (−8 · d)
      extreme = np.take_along_axis(x, np.expand_dims(np.abs(x).argmax(axis=inner), inner),
                                   axis=inner)
      d = extreme / -8
      codes = np.trunc(x * np.where(d == 0, 0, 1 / d) + np.float32(8.5)).clip(0, 15)
    elif format == 'int4_min':
      low, high = x.min(axis=inner, keepdims=True), x.max(axis=inner, keepdims=True)
      d = (high - low) / 15
      codes = np.trunc((x - low) * np.where(d == 0, 0, 1 / d) + np.float32(0.5)).clip(0, 15)
      offset = low.astype(np.float16)
    elif format == 'nf4':  # the nearest of the 16 levels, after scaling by the stored absmax
      d = np.abs(x).max(axis=inner, keepdims=True).astype(np.float16).astype(np.float32)
      normalized = np.where(d == 0, 0, x / d)
      codes = np.searchsorted((NF4[1:] + NF4[:-1]) / 2, normalized)  # a midpoint rounds up
    else:
      raise ValueError(f'unknown format {format!r}; one of {FORMATS}')
  if format != 'int8':
    low_half, high_half = np.split(codes.astype(np.uint8), 2, axis=inner)
    codes = low_half | (high_half << np.uint8(4))
  return QuantizedWeight(codes, d.astype(np.float16), offset, format, axis, np.dtype(dtype).name)


def codes_shape(shape, format: str, block: int, axis: int):
  """(codes shape, scale shape) of a weight of logical `shape`."""
  p = len(shape) + axis
  head, tail = tuple(shape[:p]) + (shape[p] // block,), tuple(shape[p + 1:])
  return head + (block if format == 'int8' else block // 2,) + tail, head + (1,) + tail


def stack(weights):
  """Per-layer weights (arrays or `QuantizedWeight`s alike) stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *weights)


def widened(tree):
  """`tree` with every `QuantizedWeight` replaced by its widened weight (a method's init reads
  the base, e.g. prompt tuning's vocabulary rows or the ladder's pruned blocks)."""
  return jax.tree.map(lambda x: x.unbox() if isinstance(x, QuantizedWeight) else x, tree,
                      is_leaf=lambda x: isinstance(x, QuantizedWeight))


def is_quantized(tree) -> bool:
  return any(isinstance(x, QuantizedWeight)
             for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
