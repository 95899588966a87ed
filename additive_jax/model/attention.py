"""Masked causal self-attention, by one of several implementations selected by name.

The mask, the one definition every implementation computes (S = num_prefix + T key slots):
  key slot j < num_prefix is a prefix slot (prefix tuning's learned key/value): every query
  sees it. Key slot j ≥ num_prefix holds the key of query slot t' = j − num_prefix; query t
  sees it iff t' ≤ t and (t' < num_virtual or segment_ids[b, t'] == segment_ids[b, t]).
So the first `num_virtual` slots (prompt vectors prepended to every row) open every packed
segment, causally, and their own segment ids are never read. Segment ids mark packed
sequences (0 = padding: padding attends to padding; its outputs are finite and unused); an
unpacked padded row passes its attention mask (1 token, 0 padding). Scores are scaled by
1/√H, the softmax runs in fp32, GQA maps query head n to kv head n // (N / K). The mask is
built inside each implementation from the segment ids: none crosses the layer scan.

'auto' is 'xla' unless `model/verified_kernels.py` lists the backend's preferred kernel
(GPU: 'cudnn', then 'pallas'; TPU: 'splash', then 'pallas') as run on this device kind
under this jax; none is listed yet, so 'auto' is 'xla' everywhere. What each can do:
  'xla'    Any backend. Plain jnp: the [B, T, S] mask built from the segment ids (XLA fuses the
           compare into the softmax) and jax.nn.dot_product_attention under jax.checkpoint,
           so the [B, N, T, S] scores are recomputed in the backward, never stored. Any
           dtype; memory O(T·S) per head within the layer.
  'cudnn'  GPU. cuDNN's fused flash attention through jax's packed (THD) layout: every run
           of equal segment ids is one sequence, causal within itself. It cannot do fp32,
           prefix or virtual slots (keys shared across segments), or head dims other than
           multiples of 8 up to 128, and it holds at most _CUDNN_MAX_SEGMENTS runs a row;
           these hand over to 'pallas' (fp32 and shared slots at trace time, with a warning;
           too many runs at run time by lax.cond: both branches compiled, and under autodiff
           both branches' residuals allocated). The packed layout is private jax API, read
           in jax 0.10.2 (see _cudnn); another version hands over to 'pallas'. Untested here
           (no GPU): benchmarks/device_check.py checks it on one.
  'splash' TPU. jax's splash attention kernel with CausalMask and SegmentIds for the token
           keys; the shared slots (prefix + virtual keys, few) are attended to with XLA and
           the two softmax parts merged by their log-sum-exp; virtual queries, which see
           shared slots only, are computed with XLA. Token length padded to a multiple of 128.
           With shared slots the backward runs splash three times (the log-sum-exp's
           gradient, which splash lacks, comes from the kernel itself: _splash_with_lse).
  'pallas' Our flash kernel (flash_pallas.py): any mask of this definition natively, GPU
           (Triton) and TPU (Mosaic); the only choice on CPU is interpret=True (slow, tests).
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings

import jax
import jax.numpy as jnp

from additive_jax.model.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from additive_jax.model.verified_kernels import auto_kernel

# The kernels' modules, imported when a kernel is first traced, never with the package: two
# are private or moving jax API (the cuDNN packed layout; Pallas's ops), and an import error
# at package import would stop a CPU run that never uses them.
_MODULES = {'cudnn': 'jax._src.cudnn.fused_attention_stablehlo',
            'splash': 'jax.experimental.pallas.ops.tpu.splash_attention',
            'pallas': 'additive_jax.model.flash_pallas'}


class KernelUnavailable(ValueError):
  """A named attention kernel this jax cannot provide."""


def kernel_module(name: str):
  """The module behind kernel `name`, or KernelUnavailable in one line."""
  try:
    return importlib.import_module(_MODULES[name])
  except ImportError as err:
    raise KernelUnavailable(
        f'attention {name!r} needs {_MODULES[name]}, which cannot be imported with jax '
        f'{jax.__version__} ({type(err).__name__}: {err}); use --config.attention=xla') from None

# The jax whose cudnn/fused_attention_stablehlo.py the packed-layout call was written against.
_CUDNN_CHECKED_JAX = '0.10.2'
_CUDNN_MAX_SEGMENTS = 16  # runs of equal ids a row: a static shape of cuDNN's packed layout


def resolve(implementation: str, backend: str | None = None, device_kind: str | None = None) -> str:
  """'auto' → the kernel `verified_kernels.auto_kernel` allows on this backend, device kind and
  jax (default: jax's default backend and its first device), else 'xla'. Other names are
  returned as they are; an unknown one raises ValueError naming the valid ones."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention implementation {implementation!r}; '
                     f'valid: {", ".join(IMPLEMENTATIONS)}')
  if implementation != 'auto':
    return implementation
  if backend is None:
    backend = jax.default_backend()
  if device_kind is None:
    device_kind = jax.devices(backend)[0].device_kind if backend == jax.default_backend() else ''
  return auto_kernel(backend, device_kind, jax.__version__)


def attend(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, num_prefix: int = 0, num_virtual: int = 0,
           implementation: str = 'xla', interpret: bool | None = None):
  """Masked causal self-attention (the module docstring's mask) → out_BTNH in q's dtype.

  k/v are cast to q's dtype. `interpret` runs the Pallas kernels ('pallas', 'splash') in
  Pallas's interpreter, on any backend; None (the default): on a CPU, which has no other
  way to run them (slow: what tests use), not elsewhere."""
  implementation = resolve(implementation)
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  (batch, length, heads, head_dim), (keys, kv_heads) = q_BTNH.shape, k_BSKH.shape[1:3]
  if keys != num_prefix + length:
    raise ValueError(f'{keys} key slots for {length} queries and {num_prefix} prefix slots')
  if heads % kv_heads or segment_ids_BT.shape != (batch, length):
    raise ValueError(f'{heads} query heads over {kv_heads} kv heads, segment ids '
                     f'{segment_ids_BT.shape} for queries {(batch, length)}')
  if not 0 <= num_virtual <= length:
    raise ValueError(f'num_virtual={num_virtual} for {length} query slots')
  k_BSKH, v_BSKH = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
  args = (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT.astype(jnp.int32))
  if implementation == 'xla':
    return _xla(*args, num_prefix, num_virtual)
  if implementation == 'pallas':
    return kernel_module('pallas').flash_attention(*args, num_prefix=num_prefix,
                                                   num_virtual=num_virtual, interpret=interpret)
  if implementation == 'splash':
    return _splash(*args, num_prefix, num_virtual, interpret)
  return _cudnn(*args, num_prefix, num_virtual)


def attend_on_mesh(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, batch_axes, **settings):
  """`attend` where a mesh is set: a kernel (a custom call XLA cannot partition, which it
  would run replicated) runs per shard of the batch under `jax.shard_map`, each device on its
  own rows; 'xla' is partitioned by XLA itself. `batch_axes`: the mesh axes the batch is
  split over (None: not split)."""
  mesh = jax.sharding.get_abstract_mesh()
  kernel = resolve(settings.get('implementation', 'xla')) != 'xla'
  if not kernel or mesh.empty or batch_axes is None:
    return attend(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, **settings)
  spec = jax.sharding.PartitionSpec(batch_axes)
  return jax.shard_map(functools.partial(attend, **settings), mesh=mesh, in_specs=(spec,) * 4,
                       out_specs=spec, check_vma=False)(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


def mask_BTS(segment_ids_BT, num_prefix: int, num_virtual: int):
  """The boolean mask of the definition, [B, T, num_prefix + T] (True: query t sees slot j)."""
  length = segment_ids_BT.shape[1]
  query_T1 = jnp.arange(length)[:, None]
  source_1S = jnp.arange(num_prefix + length)[None, :] - num_prefix  # < 0: a prefix slot
  key_ids_BS = jnp.pad(segment_ids_BT, ((0, 0), (num_prefix, 0)))  # prefix ids: never read
  same_BTS = key_ids_BS[:, None, :] == segment_ids_BT[:, :, None]
  return (source_1S <= query_T1) & ((source_1S < num_virtual) | same_BTS)


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _xla(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, num_prefix: int, num_virtual: int):
  """Recomputed in the backward pass rather than stored: the scores and probabilities
  ([B, N, T, S] each, every layer) would otherwise be the largest residuals of a train step."""
  mask_B1TS = mask_BTS(segment_ids_BT, num_prefix, num_virtual)[:, None]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS)


# ----------------------------------------------------------------------------- splash (TPU)

def _dense(q_BTNH, k_BSKH, v_BSKH, mask_TS=None):
  """Attention over a few keys in XLA, fp32: (out_BTNH, lse_BTN)."""
  batch, length, heads, head_dim = q_BTNH.shape
  kv_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  scores_BTKGS = jnp.einsum('btkgh,bskh->btkgs', q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) / math.sqrt(head_dim)
  if mask_TS is not None:
    scores_BTKGS = jnp.where(mask_TS[:, None, None, :], scores_BTKGS, -jnp.inf)
  lse_BTKG = jax.nn.logsumexp(scores_BTKGS, axis=-1)
  probs_BTKGS = jnp.exp(scores_BTKGS - lse_BTKG[..., None])
  out_BTKGH = jnp.einsum('btkgs,bskh->btkgh', probs_BTKGS, v_BSKH.astype(jnp.float32))
  return out_BTKGH.reshape(q_BTNH.shape), lse_BTKG.reshape(batch, length, heads)


def _splash_kernel(heads: int, length: int, interpret: bool, save_residuals: bool = False):
  """Causal splash attention for one row, length a multiple of 128. Built inside every traced
  function that calls it, never cached: its block tables become arrays of that trace."""
  splash = kernel_module('splash')
  block = next(b for b in (512, 256, 128) if length % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret, save_residuals=save_residuals)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _splash_with_lse(q_NLH, k_KLH, v_KLH, ids_L, static):
  """One row: (out, log-sum-exp) of splash attention, both differentiable. Splash's residual
  log-sum-exp has no gradient (its vjp raises 'Higher-order AD not supported'), nor has the
  cuDNN or XLA one of jax.nn.dot_product_attention: the backward below supplies it."""
  kernel = _splash_kernel(*static, save_residuals=True)
  ids = kernel_module('splash').SegmentIds(ids_L, ids_L)
  out_NLH, (lse_NL,) = kernel(q_NLH, k_KLH, v_KLH, ids)
  return out_NLH, lse_NL


def _splash_with_lse_forward(q_NLH, k_KLH, v_KLH, ids_L, static):
  return _splash_with_lse(q_NLH, k_KLH, v_KLH, ids_L, static), (q_NLH, k_KLH, v_KLH, ids_L)


def _splash_with_lse_backward(static, residuals, cotangents):
  """With p = softmax(q kᵀ): d lse_i/d q_i = Σ_j p_ij k_j, attention with k as the values; and
  d lse/d k_j = Σ_i g_i p_ij q_i, the value-gradient of attention at cotangent g ⊙ q. Both come
  from the kernel itself (two more forward passes and one backward than plain splash)."""
  q_NLH, k_KLH, v_KLH, ids_L = residuals
  d_out_NLH, d_lse_NL = cotangents
  kernel, ids = _splash_kernel(*static), kernel_module('splash').SegmentIds(ids_L, ids_L)
  _, pull = jax.vjp(lambda q, k, v: kernel(q, k, v, ids), q_NLH, k_KLH, v_KLH)
  dq_NLH, dk_KLH, dv_KLH = pull(d_out_NLH)
  mean_key_NLH, pull_values = jax.vjp(lambda w: kernel(q_NLH, k_KLH, w, ids), k_KLH)
  (dk_lse_KLH,) = pull_values((d_lse_NL[..., None] * q_NLH).astype(q_NLH.dtype))
  dq_NLH = dq_NLH + (d_lse_NL[..., None] * mean_key_NLH).astype(dq_NLH.dtype)
  return dq_NLH, dk_KLH + dk_lse_KLH.astype(dk_KLH.dtype), dv_KLH, None


_splash_with_lse.defvjp(_splash_with_lse_forward, _splash_with_lse_backward)


def _splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, num_prefix, num_virtual, interpret):
  batch, length, heads, head_dim = q_BTNH.shape
  shared = num_prefix + num_virtual  # key slots every token query sees: prefix, then virtual
  tokens = length - num_virtual
  padded = -(-max(tokens, 1) // 128) * 128  # splash's blocks: multiples of 128 (the lane width)

  def rows(x, scale=1.):  # [B, L, heads, H] → [B, heads, padded, H]; splash does not scale
    x = (x * scale).astype(x.dtype)
    return jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0), (0, 0))).swapaxes(1, 2)

  # a padded query comes after every real one and sees itself: no row is fully masked
  ids_BL = jnp.pad(segment_ids_BT[:, num_virtual:], ((0, 0), (0, padded - tokens)))
  args = (rows(q_BTNH[:, num_virtual:], 1 / math.sqrt(head_dim)), rows(k_BSKH[:, shared:]),
          rows(v_BSKH[:, shared:]), ids_BL)
  static = (heads, padded, interpret)
  if not shared:  # splash alone, its log-sum-exp unneeded
    kernel, segments = _splash_kernel(*static), kernel_module('splash').SegmentIds
    out_BNLH = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segments(ids, ids)))(*args)
    return out_BNLH.swapaxes(1, 2)[:, :tokens].astype(q_BTNH.dtype)
  out_BNLH, lse_BNL = jax.vmap(_splash_with_lse, in_axes=(0, 0, 0, 0, None))(*args, static)
  out_BTNH = out_BNLH.swapaxes(1, 2)[:, :tokens]
  lse_BTN = lse_BNL.swapaxes(1, 2)[:, :tokens]
  shared_out_BTNH, shared_lse_BTN = _dense(q_BTNH[:, num_virtual:], k_BSKH[:, :shared],
                                           v_BSKH[:, :shared])
  total_BTN = jnp.logaddexp(lse_BTN, shared_lse_BTN)
  out_BTNH = (out_BTNH * jnp.exp(lse_BTN - total_BTN)[..., None]
              + shared_out_BTNH * jnp.exp(shared_lse_BTN - total_BTN)[..., None])
  if num_virtual:  # virtual query t sees the prefix and virtual slots j − num_prefix ≤ t
    mask_TS = jnp.arange(shared)[None, :] - num_prefix <= jnp.arange(num_virtual)[:, None]
    virtual_BTNH, _ = _dense(q_BTNH[:, :num_virtual], k_BSKH[:, :shared], v_BSKH[:, :shared],
                             mask_TS)
    out_BTNH = jnp.concatenate([virtual_BTNH, out_BTNH], axis=1)
  return out_BTNH.astype(q_BTNH.dtype)


# ------------------------------------------------------------------------------- cudnn (GPU)

def _cudnn_handover(dtype, head_dim: int, num_shared: int) -> str | None:
  """Why cuDNN cannot take this call (None: it can)."""
  if dtype not in (jnp.bfloat16, jnp.float16):
    return f'cuDNN flash attention needs bf16/fp16, not {dtype}'
  if num_shared:
    return 'prefix/virtual slots are seen across segments: no packed sequence expresses them'
  if head_dim % 8 or head_dim > 128:
    return f'head dim {head_dim}: cuDNN takes multiples of 8 up to 128 (256 from Hopper)'
  if jax.__version__ != _CUDNN_CHECKED_JAX:
    return (f'the packed layout is private jax API, checked in jax {_CUDNN_CHECKED_JAX}, '
            f'not {jax.__version__}: re-read jax/_src/cudnn/fused_attention_stablehlo.py')
  cudnn_attention = kernel_module('cudnn')
  try:
    version = cudnn_attention.check_cudnn_version()
  except RuntimeError as error:  # no cuDNN (e.g. ROCm)
    return str(error)
  if version < 90600 or not cudnn_attention.check_compute_capability('9.0'):
    return f'the packed layout needs cuDNN ≥ 9.6 (here {version}) and a Hopper or later GPU'
  return None


def _segment_runs(segment_ids_BT, max_runs: int):
  """Runs of equal ids as cuDNN's packed layout wants them: offsets [B, max_runs + 1] and
  lengths [B, max_runs], −1 past a row's runs; and whether every row has ≤ max_runs runs."""
  length = segment_ids_BT.shape[1]
  starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                               segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  fits = jnp.all(jnp.sum(starts_BT, axis=1) <= max_runs)
  offsets_BR = jax.vmap(lambda s: jnp.nonzero(s, size=max_runs + 1, fill_value=-1)[0])(starts_BT)
  offsets_BR = offsets_BR.astype(jnp.int32)
  ends_BR = jnp.where(offsets_BR[:, 1:] >= 0, offsets_BR[:, 1:], length)
  lengths_BR = jnp.where(offsets_BR[:, :-1] >= 0, ends_BR - offsets_BR[:, :-1], -1)
  return offsets_BR, lengths_BR.astype(jnp.int32), fits


def _cudnn(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, num_prefix, num_virtual):
  heads, head_dim = q_BTNH.shape[2:]
  pallas = functools.partial(kernel_module('pallas').flash_attention, num_prefix=num_prefix,
                             num_virtual=num_virtual)
  reason = _cudnn_handover(q_BTNH.dtype, head_dim, num_prefix + num_virtual)
  if reason:
    warnings.warn(f"attention: 'cudnn' hands over to 'pallas': {reason}", stacklevel=3)
    return pallas(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  offsets_BR, lengths_BR, fits = _segment_runs(segment_ids_BT, _CUDNN_MAX_SEGMENTS)

  def fused(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    # jax 0.10.2's _fix_seqlen_offsets scales kv offsets by the *query* heads' stride (fixed
    # upstream in jax PR #39521): under GQA each kv head is repeated to the query heads here.
    group = heads // k_BSKH.shape[2]
    k_BSNH, v_BSNH = (jnp.repeat(x, group, axis=2) for x in (k_BSKH, v_BSKH))
    cudnn_attention = kernel_module('cudnn')
    return cudnn_attention.dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, q_seqlen=lengths_BR, kv_seqlen=lengths_BR, q_offsets=offsets_BR,
        kv_offsets=offsets_BR, scale=1 / math.sqrt(head_dim),
        mask_type=cudnn_attention.MaskType.PADDING_CAUSAL)

  return jax.lax.cond(fits, fused, pallas, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
