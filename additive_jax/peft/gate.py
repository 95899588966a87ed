"""Gates (UniPELT): a learned sigmoid that scales a method's contribution, token by token.

    g_t = σ(w · x_t + b)          w: [D], b: a scalar; one gate per layer and site

where x_t is what the gated module reads at token t (LoRA: its projection's input;
a bottleneck: its adapter's input; prefix tuning: the normed state entering
attention). A gated LoRA adds g_t · B A x_t (the gate replaces α/r), a gated
bottleneck g_t · s · A(h_t), and a gated prefix scales, for query t, its prefix
keys and values by g_t. Parameters: D + 1 per gate.

Two ways to turn the g_t into the scale a token gets:

  'token'     each token its own g_t. Causal: a token's output reads no later token,
              so the method trains as a causal LM and decodes with the KV cache.
  'sequence'  AdapterHub's: the mean of g_t over the call's T positions, padding
              included (`torch.mean(torch.sigmoid(self.gate(x)), dim=1)`: adapters
              1.3.0, methods/modeling.py:221, methods/lora.py:167,
              methods/prefix_tuning.py:580). Mao et al. gate a bidirectional encoder,
              where this is sound; in a causal LM every token's output then reads the
              tokens after it (training would see the answer it predicts) and a decode
              step would see only itself. Kept to compute what an AdapterHub UniPELT file
              computes, in a forward over whole sequences: refused in training and with a
              KV cache (`Method.causal`).

'' (the default) is no gate: the method's files and logits are as without the field.

Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning", ACL 2022. AdapterHub: `use_gating=True` on LoRAConfig, PrefixTuningConfig,
BnConfig (`UniPELTConfig`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GATES = ('', 'token', 'sequence')


def require_gate(method: str, gate) -> None:
  if gate not in GATES:
    raise ValueError(f'{method} gate must be one of {GATES} (\'\': none), got {gate!r}')


def gate_leaves(rng, layers: int, width: int, bias: str) -> dict:
  """`{'gate': [L, D], 'gate_bias': [L]}` as AdapterHub initializes its `nn.Linear(D, 1)`: the
  weight N(0, 0.02²); the bias zero (`bias='zero'`, the bottleneck's BERT init) or torch's
  default U(±1/√D) (`bias='linear'`: LoRA and prefix tuning re-draw only the weight)."""
  w_key, b_key = jax.random.split(rng)
  bound = 1.0 / width ** 0.5
  return {'gate': 0.02 * jax.random.normal(w_key, (layers, width), jnp.float32),
          'gate_bias': (jnp.zeros((layers,), jnp.float32) if bias == 'zero' else
                        jax.random.uniform(b_key, (layers,), jnp.float32, -bound, bound))}


def gate_values(p, x_BTI, mode: str):
  """[B, T, 1] (in x's dtype): each token's scale from one layer's `p` ({'gate': [I],
  'gate_bias': []}); x's trailing axes are its I features (o_proj's input is [B, T, N, H])."""
  dtype = x_BTI.dtype
  x_BTI = x_BTI.reshape(x_BTI.shape[:2] + (-1,))
  g_BT1 = jax.nn.sigmoid(jnp.einsum('bti,i->bt', x_BTI, p['gate'].astype(dtype))
                         + p['gate_bias'].astype(dtype))[..., None]
  if mode == 'sequence':
    g_BT1 = jnp.broadcast_to(jnp.mean(g_BT1, axis=1, keepdims=True), g_BT1.shape)
  return g_BT1
