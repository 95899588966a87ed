"""What a PEFT method is: trainable leaves plus what it does at the model's sites.

The Llama module (additive_jax/model/llama.py) calls these hooks at fixed named
places; every default is the identity, so a method overrides only the sites it
acts at and the model never branches on which methods are present.

Per-layer sites (inside the scanned block; `p` is the method's slice of the
`'peft'` tree for this layer, as returned by `layer_inputs`):
  project(p, name, x, y)   after each projection y = W x, name in q,k,v,o,gate,up,down
  mlp_hidden(p, h)         the MLP hidden activation silu(W_gate x) · W_up x
  attn_delta(p, r, f)      added to the stream after attention: x = r + f + delta
  mlp_delta(p, r, f)       added to the stream after the MLP: x = r + f + delta
  prefix_kv(p)             key/value vectors [n, K, H] placed before the keys
Model-level sites (`tree` is the method's whole subtree):
  embed(tree, x_BTD)               the token embeddings (may prepend vectors)
  final_hidden(tree, h_BTD, taps)  the backbone's final hidden state (ladder)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

PyTree = Any


def require_positive_int(method: str, name: str, value) -> None:
  """A constructor argument that counts something (a width, a rank, a number of tokens)."""
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'{method} {name} must be a positive integer, got {value!r}')


def require_number(method: str, name: str, value) -> None:
  """A real-valued constructor argument (a scale, an alpha); a bool is not one."""
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise ValueError(f'{method} {name} must be a number, got {value!r}')


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class of the methods in `aj.peft`; frozen so a model config can hash it."""

  key: ClassVar[str] = ''              # its key in variables['peft']
  acts_in_backbone: ClassVar[bool] = True
  num_prefix_tokens: ClassVar[int] = 0  # key/value slots it adds per layer
  wants_taps: ClassVar[bool] = False    # needs every layer's output hidden state
  mergeable: ClassVar[bool] = False     # can be folded into the frozen weights

  def check(self, config) -> None:
    """Raises ValueError naming the bad argument if this method cannot act on `config`."""

  def num_params(self, config) -> int:
    """Trainable parameters, from the method's formula (tests check it against the leaves)."""
    raise NotImplementedError

  def init(self, rng, config, params, tokenizer=None) -> PyTree:
    """Creates the trainable leaves; at init the method leaves the logits unchanged."""
    raise NotImplementedError

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

  def embed(self, tree, x_BTD):
    return x_BTD

  def final_hidden(self, tree, h_BTD, taps, context):
    return h_BTD

  def fold(self, tree, config):
    """(method, tree) for inference: a training-time reparameterization evaluated once (prefix
    tuning's MLP), the same logits for less work per call. Most methods have none."""
    return self, tree

  def merge(self, tree, params, config):
    """Params with this method folded in (only for `mergeable` methods)."""
    raise NotImplementedError(f'{type(self).__name__} cannot be merged into the base weights')

  def unmerge(self, tree, params, config):
    """The inverse of `merge`: the original params back."""
    raise NotImplementedError(f'{type(self).__name__} cannot be merged into the base weights')

  def call_string(self) -> str:
    """The constructor call that rebuilds this method, e.g. `IA3()`; a field whose constructor
    keyword differs from its name says so in its metadata (`{'keyword': 'init'}`)."""
    fields = ', '.join(f'{f.metadata.get("keyword", f.name)}={getattr(self, f.name)!r}'
                       for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)
    return f'{type(self).__name__}({fields})'
