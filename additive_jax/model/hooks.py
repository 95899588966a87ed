"""The site protocol: what the Llama calls a PEFT method at each of its named sites.

A method (additive_jax/peft) is an object with these hooks; every default is the
identity, so a method overrides only the sites it acts at and the model never
branches on which methods are present.

Per-layer sites (inside the scanned block; `p` is the method's slice of the
`'peft'` tree for this layer, as returned by `layer_inputs`):
  project(p, name, x, y)   after each projection y = W x, name in q,k,v,o,gate,up,down
  mlp_hidden(p, h)         the MLP hidden activation silu(W_gate x) · W_up x
  attn_delta(p, r, f)      added to the stream after attention: x = r + f + delta
  mlp_delta(p, r, f)       added to the stream after the MLP: x = r + f + delta
  prefix_kv(p)             key/value vectors [n, K, H] placed before the keys
  prefix_gate(p, x)        [B, T, 1] or None: query t sees those slots' keys and values
                           scaled by its entry (UniPELT's gated prefix); x: attention's input
  attn_heads_delta(p, q_BTNH, project_kv)
                           added to the attention's output heads [B, T, N, H] before o_proj
                           (LLaMA-Adapter's gated attention over a prompt of its own);
                           `q_BTNH` the layer's rotated queries, `project_kv(x_PD)` ->
                           (k_PKH, v_PKH) the layer's key and value projections of vectors
                           [P, D], as a token's input is projected (the `project` hooks
                           included) but without rotary; None adds nothing
  layer_output(p, x, ctx)  the layer's output, the stream after the MLP and its deltas;
                           `ctx` (model/context.py) says where each token stands in its
                           sequence (ReFT intervenes at the first and last tokens)
Model-level sites (`tree` is the method's whole subtree):
  embed(tree, x_BTD)          the token embeddings, position by position
  prepend(tree)               vectors [P, D] placed before the tokens (a soft prompt): at
                              positions 0…P−1, once per sequence (with a KV cache, in the
                              prefill only)
  final_hidden(tree, h_BTD, taps, context, cache) -> (h_BTD, cache)
                              the backbone's final hidden state (ladder); `cache` is the
                              method's own decoding state from `init_cache`, or None

A method set is checked (`check_methods`) and initialized (`init_methods`) here
too, since the model does both when it is built and when `init_peft` is called.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

PyTree = Any


class Hooks:
  """The hooks of one method, each the identity; `aj.peft.Method` builds on it."""

  key: ClassVar[str] = ''              # its key in variables['peft']
  acts_in_backbone: ClassVar[bool] = True
  num_prefix_tokens: ClassVar[int] = 0   # key/value slots it adds per layer
  num_virtual_tokens: ClassVar[int] = 0  # vectors it prepends to the tokens
  wants_taps: ClassVar[bool] = False     # needs every layer's output hidden state
  wants_token_order: ClassVar[bool] = False  # reads ctx.token_index_BT / tokens_after_BT
  # its output at a token reads no later token: it trains as a causal LM and decodes with a
  # KV cache (a gate averaged over the whole sequence does not: peft/gate.py)
  causal: ClassVar[bool] = True
  prefix_gated: ClassVar[bool] = False   # its prefix_gate gives a gate (attention doubles H)

  @property
  def num_prefix_positions(self) -> int:
    """Positions its prefix slots take before the real tokens (rotary): all of them, as
    HF PEFT places a prefix, unless the method says otherwise."""
    return self.num_prefix_tokens

  def check(self, config) -> None:
    """Raises ValueError naming the bad argument if this method cannot act on `config`."""

  def init_leaves(self, rng, config, params, tokenizer=None) -> PyTree:
    """Creates the trainable leaves; at init the method leaves the logits unchanged."""
    raise NotImplementedError(f'{type(self).__name__} defines no init_leaves')

  def layer_inputs(self, tree: PyTree, config) -> PyTree | None:
    """The per-layer part fed to the scanned blocks (leading `layers` axis), or None."""
    return tree

  def project(self, p, name: str, x, y):
    return y

  def mlp_hidden(self, p, h):
    return h

  def attn_delta(self, p, r, f):
    return None

  def mlp_delta(self, p, r, f):
    return None

  def prefix_kv(self, p):
    return None

  def prefix_gate(self, p, x_BTD):
    return None

  def attn_heads_delta(self, p, q_BTNH, project_kv):
    return None

  def layer_output(self, p, x_BTD, ctx):
    return x_BTD

  def embed(self, tree, x_BTD):
    return x_BTD

  def prepend(self, tree):
    return None

  def final_hidden(self, tree, h_BTD, taps, context, cache=None):
    return h_BTD, cache

  def init_cache(self, config, batch: int, max_len: int, dtype) -> PyTree | None:
    """The method's own decoding state beside the model's KV cache (the ladder's side
    network keeps its keys and values), or None; every leaf [L, B, ...], batch second."""
    return None

  def call_string(self) -> str:
    """The constructor call that rebuilds this method, e.g. `IA3()` (fields at their default
    left out; a whole number held as a float, as a config entry holds it, written as an int)."""
    def literal(value):
      integral = isinstance(value, float) and value.is_integer()
      return repr(int(value) if integral else value)
    fields = ', '.join(f'{f.name}={literal(getattr(self, f.name))}'
                       for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)
    return f'{type(self).__name__}({fields})'


def check_methods(methods, config) -> None:
  """Refuses, before any compute, a method set with a method twice (each owns one key of
  `variables['peft']`), a method that cannot act on `config`, or two methods that cannot
  train together."""
  keys = [m.key for m in methods]
  for method in methods:
    if not isinstance(method, Hooks):
      raise TypeError(f'peft entries must be aj.peft methods, got {method!r}')
    if keys.count(method.key) > 1:
      raise ValueError(f'method {method.key!r} is configured twice; each method owns one '
                       f"subtree of variables['peft'] (merge the settings into one)")
    method.check(config)
  prompts = [m for m in methods if m.num_virtual_tokens]
  if len(prompts) > 1:  # their inference forms (`fold`) would both be a PromptTuning
    raise ValueError(f'{prompts[0].call_string()} and {prompts[1].call_string()} both prepend a '
                     'soft prompt and infer as one PromptTuning each; train one of them')
  outside = [m for m in methods if not m.acts_in_backbone]
  inside = [m for m in methods if m.acts_in_backbone]
  if outside and inside:
    raise ValueError(
        f'{outside[0].call_string()} runs the backbone under stop_gradient, so '
        f'{", ".join(m.call_string() for m in inside)} acting inside the backbone would get no '
        'gradient; train them in separate runs')


def init_methods(methods, rng, config, params, tokenizer=None) -> dict:
  """`{key: leaves}` of every method at its initial value, each from its own random key."""
  rngs = jax.random.split(rng, max(len(methods), 1))
  return {m.key: m.init_leaves(key, config, params, tokenizer) for m, key in zip(methods, rngs)}
