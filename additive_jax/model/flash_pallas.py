"""Flash attention in Pallas for the masked causal self-attention of attention.py.

The mask is attention.py's (its docstring states it): key slot j holds a prefix slot if
j < P, else the key of query slot j − P; query t sees slot j iff j − P ≤ t and
(j − P < num_virtual or segment[j − P] = segment[t]). The kernels compute it per block from
segment ids and block indices; no [T, S] mask exists anywhere, nor [T, S] scores but one
[block_q, block_k] tile at a time.

Forward (grid B × N × query blocks): online softmax over key blocks with fp32 accumulators
(FlashAttention-2). The key-block loop stops at the last block the block's last query can
see causally, and skips blocks no query of the block can see: a block whose segment ids
share no range with the query block's (two ranges that do not overlap share no id) and that
holds no prefix or virtual slot. Backward: rowsum(o · do) in XLA, then a dq kernel (grid over
query blocks, loop over key blocks) and a dk/dv kernel (grid B × K × key blocks, loop over
the G = N / K query heads of the kv head and over query blocks); the same bounds and skips.
Residuals: o and the log-sum-exp, [B, N, T] in fp32.

Layout: heads-major, [B, N, T, H] (the kernels see [T, H] tiles, which suits both the GPU
and the TPU). T is padded up to a block multiple and the keys to P + padded T: a padded
query comes after every real one, so causality hides the padded keys from real queries; the
padded queries' outputs are dropped and their cotangents are zero, so they touch no gradient.

Lowering: Triton on a GPU (`pallas.triton.CompilerParams`: Pallas's default GPU lowering in
this jax is Mosaic GPU, whose warpgroup model this kernel is not written for), Mosaic on a
TPU (block sizes there: multiples of 128, the lane width), `interpret=True` anywhere (how the
tests run it on CPU; the tests also lower it for both accelerators, which runs Pallas's
lowering but not the Triton or TPU compiler). Triton wants power-of-two tiles: block sizes
are, and a head dim that is not gets zero-padded (zero columns change no score and give zero
output columns). On a TPU the kernels hold whole-sequence keys (forward, dq) or queries of G
heads (dk/dv) in VMEM: fine at T = 1k–2k, not tuned beyond; 'splash' is the TPU default.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# A finite "minus infinity": a row whose first tiles are all masked then gets finite, soon
# discarded statistics instead of inf − inf = NaN (the TPU and GPU kernels of jax do the same).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
  """What the kernels are specialized on (static, hashable)."""
  scale: float
  num_prefix: int
  num_virtual: int
  block_q: int
  block_k: int
  interpret: bool
  platform: str  # 'gpu', 'tpu' or 'cpu' (then interpret): picks the compiler parameters

  @property
  def num_shared(self) -> int:
    """Leading key slots every query may see (prefix, then virtual): never skipped."""
    return self.num_prefix + self.num_virtual


def _visible(q_slot, q_seg, key_slot, k_seg, cfg: _Config):
  """The mask of one tile, [bq, bk], from column (bq, 1) and row (1, bk) operands."""
  source = key_slot - cfg.num_prefix  # the query slot whose key this is (< 0: a prefix slot)
  return (source <= q_slot) & ((source < cfg.num_virtual) | (k_seg == q_seg))


def _dot(a, b, *, trans_a=False, trans_b=False):
  """a · b with fp32 accumulation; fp32 inputs at full precision (no TF32 on a GPU)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _may_see(start_k, k_seg, q_min, q_max, cfg: _Config):
  """Whether a key block may hold a slot the query block sees: it holds shared slots, or the
  two blocks' id ranges overlap (False only where no slot is visible; True may still be)."""
  return (start_k < cfg.num_shared) | ((jnp.min(k_seg) <= q_max) & (jnp.max(k_seg) >= q_min))


def _causal_key_blocks(q_block, num_key_blocks: int, cfg: _Config):
  """Key blocks 0 … this − 1 hold every slot the query block can see causally."""
  last_slot = cfg.num_prefix + (q_block + 1) * cfg.block_q  # one past the last visible slot
  return jnp.minimum(lax.div(last_slot + cfg.block_k - 1, cfg.block_k), num_key_blocks)


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, *, cfg: _Config):
  bq, bk = cfg.block_q, cfg.block_k
  q_block = pl.program_id(2)
  q = q_ref[...]
  q_seg = q_seg_ref[...]
  q_slot = q_block * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_min, q_max = jnp.min(q_seg), jnp.max(q_seg)

  def visit(start_k, carry):
    acc, m, l = carry
    k, v = k_ref[pl.ds(start_k, bk), :], v_ref[pl.ds(start_k, bk), :]
    key_slot = start_k + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    s = _dot(q, k, trans_b=True) * cfg.scale
    s = jnp.where(_visible(q_slot, q_seg, key_slot, k_seg_ref[:, pl.ds(start_k, bk)], cfg),
                  s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next)
    l = l * correction + jnp.sum(p, axis=1, keepdims=True)
    return acc * correction + _dot(p.astype(v.dtype), v), m_next, l

  def body(key_block, carry):
    start_k = pl.multiple_of(key_block * bk, bk)
    k_seg = k_seg_ref[:, pl.ds(start_k, bk)]
    return lax.cond(_may_see(start_k, k_seg, q_min, q_max, cfg), visit, lambda _, c: c,
                    start_k, carry)

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq, 1), -jnp.inf, jnp.float32),
           jnp.zeros((bq, 1), jnp.float32))
  num_blocks = _causal_key_blocks(q_block, k_ref.shape[0] // bk, cfg)
  acc, m, l = lax.fori_loop(0, num_blocks, body, carry)
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: _Config):
  bq, bk = cfg.block_q, cfg.block_k
  q_block = pl.program_id(2)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = q_seg_ref[...]
  q_slot = q_block * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_min, q_max = jnp.min(q_seg), jnp.max(q_seg)

  def visit(start_k, dq):
    k, v = k_ref[pl.ds(start_k, bk), :], v_ref[pl.ds(start_k, bk), :]
    key_slot = start_k + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    mask = _visible(q_slot, q_seg, key_slot, k_seg_ref[:, pl.ds(start_k, bk)], cfg)
    p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * cfg.scale - lse), 0.)
    ds = p * (_dot(do, v, trans_b=True) - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  def body(key_block, dq):
    start_k = pl.multiple_of(key_block * bk, bk)
    k_seg = k_seg_ref[:, pl.ds(start_k, bk)]
    return lax.cond(_may_see(start_k, k_seg, q_min, q_max, cfg), visit, lambda _, c: c,
                    start_k, dq)

  num_blocks = _causal_key_blocks(q_block, k_ref.shape[0] // bk, cfg)
  dq = lax.fori_loop(0, num_blocks, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg: _Config):
  bq, bk = cfg.block_q, cfg.block_k
  start_k = pl.program_id(2) * bk
  k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]
  key_slot = start_k + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  k_min, k_max = jnp.min(k_seg), jnp.max(k_seg)
  shared = start_k < cfg.num_shared
  num_heads, num_q = q_ref.shape[0], q_ref.shape[1]
  # the first query that sees this block's first non-prefix slot causally
  first_q_block = lax.div(jnp.maximum(start_k - cfg.num_prefix, 0), bq)

  def visit(head, start_q, carry):
    dk, dv = carry
    q, do = q_ref[head, pl.ds(start_q, bq), :], do_ref[head, pl.ds(start_q, bq), :]
    lse, delta = lse_ref[head, pl.ds(start_q, bq), :], delta_ref[head, pl.ds(start_q, bq), :]
    q_slot = start_q + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    mask = _visible(q_slot, q_seg_ref[pl.ds(start_q, bq), :], key_slot, k_seg, cfg)
    p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * cfg.scale - lse), 0.)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (_dot(do, v, trans_b=True) - delta)
    return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

  def over_queries(head, carry):
    def body(q_block, carry):
      start_q = pl.multiple_of(q_block * bq, bq)
      q_seg = q_seg_ref[pl.ds(start_q, bq), :]
      needed = shared | ((jnp.min(q_seg) <= k_max) & (jnp.max(q_seg) >= k_min))
      return lax.cond(needed, functools.partial(visit, head), lambda _, c: c, start_q, carry)
    return lax.fori_loop(first_q_block, num_q // bq, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, num_heads, over_queries, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(cfg: _Config, num_grid_axes: int, head_dim: int):
  if cfg.interpret:
    return None
  if cfg.platform == 'gpu':
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  if cfg.platform == 'tpu':
    return pltpu.CompilerParams(dimension_semantics=('parallel',) * num_grid_axes)
  raise ValueError(f"Pallas kernels run on '{cfg.platform}' only with interpret=True")


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, head_dim: int, name: str):
  return pl.pallas_call(functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
                        compiler_params=_compiler_params(cfg, len(grid), head_dim), name=name)


def _forward(q, k, v, q_seg, k_seg, cfg: _Config):
  """q [B, N, Tq, H], k/v [B, K, Sk, H], q_seg [B, Tq, 1], k_seg [B, 1, Sk] → o, lse."""
  (batch, heads, length, head_dim), (kv_heads, keys) = q.shape, k.shape[1:3]
  group = heads // kv_heads
  q_tile = pl.BlockSpec((None, None, cfg.block_q, head_dim), lambda b, n, i: (b, n, i, 0))
  kv_full = pl.BlockSpec((None, None, keys, head_dim), lambda b, n, i: (b, n // group, 0, 0))
  return _call(
      _forward_kernel, cfg, (batch, heads, length // cfg.block_q),
      [q_tile, kv_full, kv_full, pl.BlockSpec((None, cfg.block_q, 1), lambda b, n, i: (b, i, 0)),
       pl.BlockSpec((None, 1, keys), lambda b, n, i: (b, 0, 0))],
      [q_tile, pl.BlockSpec((None, None, cfg.block_q, 1), lambda b, n, i: (b, n, i, 0))],
      [jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((batch, heads, length, 1), jnp.float32)], head_dim, 'flash_forward')(
          q, k, v, q_seg, k_seg)


def _backward(cfg: _Config, residuals, do):
  q, k, v, q_seg, k_seg, o, lse = residuals
  (batch, heads, length, head_dim), (kv_heads, keys) = q.shape, k.shape[1:3]
  group = heads // kv_heads
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)

  q_tile = pl.BlockSpec((None, None, cfg.block_q, head_dim), lambda b, n, i: (b, n, i, 0))
  row_tile = pl.BlockSpec((None, None, cfg.block_q, 1), lambda b, n, i: (b, n, i, 0))
  kv_full = pl.BlockSpec((None, None, keys, head_dim), lambda b, n, i: (b, n // group, 0, 0))
  dq = _call(
      _dq_kernel, cfg, (batch, heads, length // cfg.block_q),
      [q_tile, kv_full, kv_full, pl.BlockSpec((None, cfg.block_q, 1), lambda b, n, i: (b, i, 0)),
       pl.BlockSpec((None, 1, keys), lambda b, n, i: (b, 0, 0)), q_tile, row_tile, row_tile],
      q_tile, jax.ShapeDtypeStruct(q.shape, q.dtype), head_dim, 'flash_dq')(
          q, k, v, q_seg, k_seg, do, lse, delta)

  # the G query heads of kv head n as one block: [B, K, G, Tq, ·]
  grouped = lambda x: x.reshape(batch, kv_heads, group, *x.shape[2:])
  q_full = pl.BlockSpec((None, None, group, length, head_dim), lambda b, n, j: (b, n, 0, 0, 0))
  row_full = pl.BlockSpec((None, None, group, length, 1), lambda b, n, j: (b, n, 0, 0, 0))
  kv_tile = pl.BlockSpec((None, None, cfg.block_k, head_dim), lambda b, n, j: (b, n, j, 0))
  dk, dv = _call(
      _dkv_kernel, cfg, (batch, kv_heads, keys // cfg.block_k),
      [q_full, kv_tile, kv_tile, pl.BlockSpec((None, length, 1), lambda b, n, j: (b, 0, 0)),
       pl.BlockSpec((None, 1, cfg.block_k), lambda b, n, j: (b, 0, j)), q_full, row_full,
       row_full],
      [kv_tile, kv_tile], [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2, head_dim, 'flash_dkv')(
          grouped(q), k, v, q_seg, k_seg, grouped(do), grouped(lse), grouped(delta))
  return dq, dk, dv, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, k_seg, cfg: _Config):
  return _forward(q, k, v, q_seg, k_seg, cfg)[0]


def _flash_forward(q, k, v, q_seg, k_seg, cfg: _Config):
  o, lse = _forward(q, k, v, q_seg, k_seg, cfg)
  return o, (q, k, v, q_seg, k_seg, o, lse)


_flash.defvjp(_flash_forward, _backward)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block(requested: int, length: int, platform: str) -> int:
  """The requested block, or a smaller power of two when the sequence is shorter, so short
  inputs are not padded to a full block: down to 16 (Triton's smallest dot), 128 on a TPU
  (a key block is a lane-dim slice of the key ids there)."""
  smallest = 128 if platform == 'tpu' else 16
  return min(requested, max(smallest, 1 << max(length - 1, 1).bit_length()))


def flash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, num_prefix: int = 0,
                    num_virtual: int = 0, block_q: int = 128, block_k: int = 128,
                    interpret: bool = False, platform: str | None = None):
  """attention.attend's semantics with the Pallas kernels; `platform` (default: jax's default
  backend) picks the lowering when not interpreting."""
  (batch, length, heads, head_dim), keys = q_BTNH.shape, k_BSKH.shape[1]
  if keys != num_prefix + length:
    raise ValueError(f'{keys} key slots; expected num_prefix + T = {num_prefix + length}')
  platform = platform or jax.default_backend()
  bq, bk = _block(block_q, length, platform), _block(block_k, num_prefix + length, platform)
  cfg = _Config(1 / math.sqrt(head_dim), num_prefix, num_virtual, bq, bk, interpret, platform)
  padded_length = _round_up(length, bq)
  padded_keys = _round_up(num_prefix + padded_length, bk)
  padded_dim = head_dim if cfg.platform == 'tpu' else 1 << (head_dim - 1).bit_length()

  def heads_major(x, to_length):  # [B, L, heads, H] → [B, heads, to_length, padded H]
    return jnp.pad(x.swapaxes(1, 2), ((0, 0), (0, 0), (0, to_length - x.shape[1]),
                                      (0, padded_dim - head_dim)))

  # Key slots carry their source query's id. Padded slots repeat the last id (any would do, as
  # said above; the last one keeps the blocks' id ranges, hence the skipping, tight); prefix
  # slots take 0 (the mask never reads their ids).
  segment_ids_BT = segment_ids_BT.astype(jnp.int32)
  extend = lambda ids, to: jnp.pad(ids, ((0, 0), (0, to - ids.shape[1])), mode='edge')
  q_seg = extend(segment_ids_BT, padded_length)[..., None]
  k_seg = jnp.pad(extend(segment_ids_BT, padded_keys - num_prefix), ((0, 0), (num_prefix, 0)))
  out = _flash(heads_major(q_BTNH, padded_length), heads_major(k_BSKH, padded_keys),
               heads_major(v_BSKH, padded_keys), q_seg, k_seg[:, None, :], cfg)
  return out[:, :, :length, :head_dim].swapaxes(1, 2)
