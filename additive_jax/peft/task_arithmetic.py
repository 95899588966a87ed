"""Task tensors combined into one: weighted sums, TIES, DARE, magnitude pruning, a truncated SVD.

The rules of HF PEFT's `peft/utils/merge_utils.py` (0.21), on n task tensors θ_i of one
shape with weights w_i, each θ_i [L, X, Y]: one matrix per layer, as PEFT holds one per
module:

  linear           Σ w_i θ_i                                     (task arithmetic)
  magnitude_prune  Σ w_i · top_k(θ_i)                            k = ⌊density · X·Y⌋ by |θ|
  ties             Σ_i w_i m_i top_k(θ_i) / max(1, Σ_i m_i)      m_i: top_k(θ_i) has the
                   majority sign, s = sign(Σ_i top_k(θ_i)) ('total') or sign(Σ_i sign(top_k θ_i))
                   ('frequency'), s ≥ 0 counting as +; a pruned zero is never counted
  dare_linear      Σ w_i · keep_i ⊙ θ_i / density                keep_i ~ Bernoulli(density)
  dare_ties        ties' sign election and disjoint mean over keep_i ⊙ θ_i / density

A density of 1 or more prunes nothing (as PEFT, which warns). DARE's keep masks are
drawn by the caller (lora_merges.py), so that a test can pass PEFT's.

`truncated_svd` splits ΔW [L, O, I] into rank-r factors as PEFT's svd merge and
AdapterHub's `lora_delta_w_svd` do: ΔW = U S Vh, B = U[:, :r]·S[:r] [O, r],
A = Vh[:r] [r, I], with PEFT's optional clamp of both to ±(the `clamp` quantile of their
values, per layer). The sign of each singular pair (u_k, vh_k) is LAPACK's choice, and
torch's and jax's differ: it is fixed here (the largest |entry| of u_k positive), so the
factors do not depend on the LAPACK build. B·A does not depend on it; PEFT's clamp does
(a quantile of the values, not of their magnitudes), so a clamped merge equals PEFT's
where PEFT's SVD returns the same signs (the tests make it so).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

RULES = ('linear', 'magnitude_prune', 'ties', 'dare_linear', 'dare_ties')
SIGN_METHODS = ('total', 'frequency')


def _top_k_mask(t_LXY, density):
  """1 on the ⌊density · X·Y⌋ entries of each layer's matrix largest in magnitude, else 0."""
  flat_LM = jnp.abs(t_LXY).reshape(t_LXY.shape[0], -1)
  k = int(density * flat_LM.shape[1])
  if k == 0:
    return jnp.zeros_like(t_LXY)
  _, index_LK = jax.lax.top_k(flat_LM, k)
  rows_L1 = jnp.arange(flat_LM.shape[0])[:, None]
  return jnp.zeros_like(flat_LM).at[rows_L1, index_LK].set(1.0).reshape(t_LXY.shape)


def _majority_sign_mask(t_NL, method):
  sign_NL = jnp.sign(t_NL)
  magnitude_L = t_NL.sum(axis=0) if method == 'total' else sign_NL.sum(axis=0)
  majority_L = jnp.where(magnitude_L >= 0, 1.0, -1.0)
  return sign_NL == majority_L


def combine(tensors, weights, rule: str, density: float | None = None,
            majority_sign_method: str = 'total', keep=None):
  """One tensor from `tensors` (each [L, X, Y], fp32) by `rule` with `weights` (floats);
  `keep` (DARE): one 0/1 mask per tensor, of its shape."""
  keep = None if keep is None else jnp.stack([jnp.asarray(k, jnp.float32) for k in keep])
  return _combine(jnp.stack([jnp.asarray(x, jnp.float32) for x in tensors]),
                  jnp.asarray(weights, jnp.float32), keep, rule, density, majority_sign_method)


# one program per rule and shape: compiled once, where op-by-op dispatch compiles a dozen
@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _combine(t_NLXY, w_N, keep_NLXY, rule, density, majority_sign_method):
  w_N111 = w_N.reshape((-1,) + (1,) * (t_NLXY.ndim - 1))
  prunes = density is not None and density < 1  # PEFT prunes nothing at density >= 1
  if rule in ('magnitude_prune', 'ties') and prunes:
    t_NLXY = jax.vmap(lambda x: x * _top_k_mask(x, density))(t_NLXY)
  elif rule in ('dare_linear', 'dare_ties') and prunes:
    t_NLXY = t_NLXY * keep_NLXY / jnp.float32(density)
  if rule in ('ties', 'dare_ties'):
    mask_NLXY = _majority_sign_mask(t_NLXY, majority_sign_method)
    summed_LXY = (t_NLXY * w_N111 * mask_NLXY).sum(axis=0)
    return summed_LXY / jnp.maximum(mask_NLXY.sum(axis=0).astype(jnp.float32), 1.0)
  return (t_NLXY * w_N111).sum(axis=0)


@jax.jit
def lora_delta(a_LIR, b_LRO, scaling):
  """scaling · B·A [L, O, I] of LoRA's leaves (PEFT's layout, `get_delta_weight`)."""
  ba_LOI = jnp.einsum('lro,lir->loi', jnp.asarray(b_LRO, jnp.float32),
                      jnp.asarray(a_LIR, jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return ba_LOI * jnp.asarray(scaling, jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def truncated_svd(delta_LOI, rank: int, clamp: float | None = None, full_matrices: bool = True):
  """(a [L, I, r], b [L, r, O]), LoRA's leaves, from ΔW [L, O, I] in PEFT's layout: a = Aᵀ,
  b = Bᵀ, so a @ b is the rank-r truncation of ΔWᵀ (clamped, given `clamp`)."""
  u_LOK, s_LK, vh_LKI = jnp.linalg.svd(jnp.asarray(delta_LOI, jnp.float32),
                                       full_matrices=full_matrices)
  u_LOR, vh_LRI = u_LOK[..., :rank], vh_LKI[:, :rank, :]
  # LAPACK's sign of each singular pair is arbitrary (jax's and torch's differ); fixed here
  # so that the largest entry of each column of U is positive, as in sklearn's svd_flip
  largest_L1R = jnp.take_along_axis(u_LOR, jnp.abs(u_LOR).argmax(axis=1)[:, None, :], axis=1)
  sign_L1R = jnp.where(largest_L1R < 0, -1.0, 1.0).astype(u_LOR.dtype)
  b_LOR = u_LOR * sign_L1R * s_LK[:, None, :rank]  # U @ diag(S), exactly
  a_LRI = vh_LRI * jnp.swapaxes(sign_L1R, 1, 2)
  if clamp is not None:
    values_LM = jnp.concatenate([b_LOR.reshape(b_LOR.shape[0], -1),
                                 a_LRI.reshape(a_LRI.shape[0], -1)], axis=1)
    high_L11 = jnp.quantile(values_LM, clamp, axis=1)[:, None, None]
    b_LOR = jnp.clip(b_LOR, -high_L11, high_L11)
    a_LRI = jnp.clip(a_LRI, -high_L11, high_L11)
  return jnp.swapaxes(a_LRI, 1, 2), jnp.swapaxes(b_LOR, 1, 2)
