"""Prefix key/value slots placed before a layer's keys, a gated prefix included.

A prefix (prefix tuning's n learned keys and values per KV head) enters the
attention as a cache would: its slots come first, every query sees them, no
rotary embedding is applied to them. The order of the slots does not matter
(every query sees all of them), so several methods' prefixes are simply
concatenated.

A gated prefix (UniPELT, peft/gate.py) scales, for query t, its slots' keys and
values by g_t:

    out_t = Σ_j a_tj v̂_j,   a_t = softmax_j(q_t · k̂_j / √H),   (k̂_j, v̂_j) = g_t (k_j, v_j)
                                                                   for a gated slot j

A query-dependent key is no attention an attention kernel computes, so the head
dim is doubled: the query becomes [q ; g q]·√2, a gated slot's key [0 ; k] and
value [0 ; v], every other slot's key [k ; 0] and value [v ; 0]. Then q'·k'/√(2H)
is q·k/√H for an ungated slot and g q·k/√H for a gated one, and the output
[o₁ ; o₂] gives out = o₁ + g·o₂: exactly the gated attention, through any kernel,
at twice the attention's cost in the layers of such a method.
"""

from __future__ import annotations

import jax.numpy as jnp


def with_prefixes(q_BTNH, k_BSKH, v_BSKH, prefixes):
  """(q, keys, values, gate_BT1) with the `prefixes` [(k [n,K,H], v [n,K,H], gate [B,T,1] or
  None), ...] placed before the keys; with a gate, q, keys and values are the doubled ones and
  `ungate` recovers the output."""
  if not prefixes:
    return q_BTNH, k_BSKH, v_BSKH, None
  batch = (k_BSKH.shape[0],)

  def slots(t_PKH):
    return jnp.broadcast_to(t_PKH, batch + t_PKH.shape).astype(k_BSKH.dtype)

  gated = [p for p in prefixes if p[2] is not None]
  if len(gated) > 1:
    raise ValueError('two gated prefixes in one model: at most one method may gate a prefix')
  plain = [p for p in prefixes if p[2] is None]
  keys_BSKH = jnp.concatenate([slots(k) for k, _, _ in plain] + [k_BSKH], axis=1)
  values_BSKH = jnp.concatenate([slots(v) for _, v, _ in plain] + [v_BSKH], axis=1)
  if not gated:
    return q_BTNH, keys_BSKH, values_BSKH, None
  gk_PKH, gv_PKH, gate_BT1 = gated[0]

  def doubled(gated_BPKH, others_BSKH):  # gated slots [0 ; t], the others [t ; 0]
    zeros = jnp.zeros_like
    return jnp.concatenate([jnp.concatenate([zeros(gated_BPKH), gated_BPKH], -1),
                            jnp.concatenate([others_BSKH, zeros(others_BSKH)], -1)], axis=1)

  g_BT11 = gate_BT1[..., None].astype(q_BTNH.dtype)
  q2_BTNH = jnp.concatenate([q_BTNH, q_BTNH * g_BT11], -1) * jnp.sqrt(2.0).astype(q_BTNH.dtype)
  return (q2_BTNH, doubled(slots(gk_PKH), keys_BSKH), doubled(slots(gv_PKH), values_BSKH),
          gate_BT1)


def ungate(out_BTNH, gate_BT1):
  """o₁ + g·o₂ of the doubled attention's output [B, T, N, 2H]."""
  half = out_BTNH.shape[-1] // 2
  return out_BTNH[..., :half] + gate_BT1[..., None].astype(out_BTNH.dtype) * out_BTNH[..., half:]
