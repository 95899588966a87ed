"""Sequential adapters (MAD-X): frozen bottleneck adapters applied one after the other at the same
sites, then one trained bottleneck adapter last, exactly as AdapterHub's `Stack`.

MAD-X trains a language adapter on unlabelled text of one language, then a task adapter
on top of it with the language adapter frozen; at test time the language adapter is
swapped for another language's. Here the frozen adapters are read from adapter files
(`adapters`: ours or AdapterHub's directories, or run folders, which the trainer reads)
and the one after them trains.

With r the stream before a sublayer and f its output (pre-norm block: x = r + f), the
adapters A_1 … A_n at that site with scales s_i (A_n the trained one):

    f_0 = f
    f_i = f_{i-1} + s_i · A_i(u_i)     u_i = r + f_{i-1}   Pfeiffer (after the MLP)
                                        u_i = f_{i-1}       Houlsby (after attention and the MLP)
    x   = r + f_n

so each adapter reads what the ones before it made of the sublayer's output, under its own
placement's rule (bottleneck.py): Pfeiffer adapters alone are x_i = x_{i-1} + s_i · A_i(x_{i-1})
from x_0 = r + f. After attention only the Houlsby adapters act, in their order. A gated
adapter's output is scaled by its gate on u_i. This is AdapterHub's `Stack` on a Llama
(adapters 1.3.0, methods/adapter_layer_base.py `compose_stack`: each adapter's `pre_forward`
then `Adapter.forward`, the last one's `post_forward`): Pfeiffer and Houlsby adapters, mixed
in any order, as AdapterHub's files of seq_bn and double_seq_bn say.

A parallel adapter (par_bn) is refused: AdapterHub's `ParallelAdapter.pre_forward` returns
r for both its input and its residual, so in a Stack it discards what the adapters before
it added (`Stack(par_a, par_b)` gives exactly par_b's logits) and one followed by another
adapter drops the sublayer output f.

Parameters: trainable, the trained adapter's S·L·(2·D·R + R + D), S = 1 (Pfeiffer) or 2
(Houlsby), plus S·L·(D + 1) with a gate (bottleneck.py); frozen, Σ_i S_i·L·(2·D·R_i + R_i + D)
over the stacked adapters, each at its own width R_i and placement (SmolLM2-135M, D = 576,
L = 30, a Pfeiffer language adapter of reduction factor 2 under a Pfeiffer task adapter of
16: 1,262,520 trainable, 9,979,200 frozen).

MAD-X's invertible adapters (at the embeddings, AdapterHub's SeqBnInvConfig) are not part
of it: AdapterHub's Stack of seq_bn and double_seq_bn adapters is.

Leaves: the trained adapter's as a Bottleneck's ({'mlp': {'down', 'down_bias', 'up',
'up_bias'}} and 'attn' for Houlsby, leading layers axis) and, never trained
(`frozen_keys`), 'frozen': {'0': the first stacked adapter's Bottleneck leaves, '1': …}.

Pfeiffer, Vulić, Gurevych and Ruder, "MAD-X: An Adapter-Based Framework for Multi-Task
Cross-Lingual Transfer", EMNLP 2020 (arXiv 2005.00052). AdapterHub: `Stack` (composition.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

from additive_jax.peft.base import Method
from additive_jax.peft.bottleneck import Bottleneck, mlp_adapter_input
from additive_jax.peft.frozen import load_frozen
from additive_jax.peft.registry import parse_method

FROZEN = 'frozen'
# the placements AdapterHub's Stack composes by the formula above (a parallel one: see there)
STACKABLE = ('pfeiffer', 'houlsby')


def require_stackable(where: str, method) -> None:
  """A Bottleneck of a placement AdapterHub's Stack composes, or one clear ValueError."""
  if not isinstance(method, Bottleneck):
    raise ValueError(f'{where} holds {method.call_string()}; Sequential stacks bottleneck '
                     'adapters (Pfeiffer or Houlsby) only')
  if method.placement not in STACKABLE:
    raise ValueError(f'{where} is a {method.placement} adapter ({method.call_string()}); '
                     'Sequential stacks Pfeiffer and Houlsby adapters only: in AdapterHub\'s '
                     'Stack a parallel adapter discards what the adapters before it added')


@dataclasses.dataclass(frozen=True)
class Sequential(Method):
  adapters: tuple[str, ...] = ()         # the frozen adapters' directories, applied in order
  adapter_methods: tuple[str, ...] = ()  # their constructor calls, read from them (`with_frozen`)
  # the trained adapter, applied last: Bottleneck's fields
  dim: int | None = None
  placement: str = 'pfeiffer'
  activation: str = 'relu'
  scale: float = 1.0
  reduction_factor: float | None = None
  gate: str = ''

  key: ClassVar[str] = 'sequential'
  frozen_keys: ClassVar[tuple[str, ...]] = (FROZEN,)
  optimizer_defaults: ClassVar[dict] = Bottleneck.optimizer_defaults

  def __post_init__(self):
    for name in ('adapters', 'adapter_methods'):
      value = getattr(self, name)
      if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f'Sequential {name} must be a tuple of non-empty strings, got {value!r}')
      object.__setattr__(self, name, tuple(value))  # a list, as a literal may give, hashes too
    if not (self.adapters or self.adapter_methods):
      raise ValueError('Sequential needs the frozen adapters it applies first: adapters=(a '
                       'directory, …)')
    if self.adapters and self.adapter_methods and len(self.adapters) != len(self.adapter_methods):
      raise ValueError(f'Sequential has {len(self.adapters)} adapters and '
                       f'{len(self.adapter_methods)} adapter_methods; one method an adapter')
    require_stackable('Sequential\'s trained adapter', self.trained)  # a Bottleneck's checks too
    _ = self.stacked  # parsed and checked here, once

  @functools.cached_property
  def trained(self) -> Bottleneck:
    """The adapter it trains, applied last."""
    return Bottleneck(dim=self.dim, placement=self.placement, activation=self.activation,
                      scale=self.scale, reduction_factor=self.reduction_factor, gate=self.gate)

  @functools.cached_property
  def stacked(self) -> tuple[Bottleneck, ...] | None:
    """The frozen adapters in order; None until their files have been read (`with_frozen`)."""
    if not self.adapter_methods:
      return None
    methods = []
    for index, text in enumerate(self.adapter_methods):
      method = parse_method(text)
      require_stackable(f'Sequential adapter_methods[{index}]', method)
      methods.append(method)
    return tuple(methods)

  def _chain(self) -> tuple[Bottleneck, ...]:
    if self.stacked is None:
      raise ValueError(f'Sequential(adapters={self.adapters!r}) has not read its adapters: '
                       'a run reads them when it starts; in Python call '
                       'its read_adapters(config)')
    return (*self.stacked, self.trained)

  @property
  def causal(self) -> bool:
    return all(m.causal for m in self._chain())

  def check(self, config) -> None:
    for method in self._chain():
      method.check(config)

  def num_params(self, config) -> int:
    return self.trained.num_params(config)

  def num_frozen_params(self, config) -> int:
    return sum(m.num_params(config) for m in self._chain()[:-1])

  def frozen_sources(self) -> tuple[str, ...]:
    return self.adapters

  def with_frozen(self, paths, methods) -> Sequential:
    for index, method in enumerate(methods):
      require_stackable(f'Sequential adapter {paths[index]}', method)
    return dataclasses.replace(self, adapters=tuple(paths),
                               adapter_methods=tuple(m.call_string() for m in methods))

  def read_adapters(self, config) -> Sequential:
    """This method with its adapters' settings read from their directories (what a run does
    when it starts), for the base `config`."""
    return self.with_frozen(self.adapters, tuple(load_frozen(p, config)[0] for p in self.adapters))

  def shape_alike(self) -> Sequential:
    # the stacked adapters' own init has their files' shapes: no file is read
    return dataclasses.replace(self, adapters=())

  def init_leaves(self, rng, config, params, tokenizer=None):
    stacked = self._chain()[:-1]
    frozen = {}
    for index, method in enumerate(stacked):
      if self.adapters:
        loaded, frozen[str(index)] = load_frozen(self.adapters[index], config)
        if loaded != method:
          raise ValueError(f'{self.adapters[index]} holds {loaded.call_string()}, not the '
                           f'{method.call_string()} Sequential was built with')
      else:  # shapes only (`shape_alike`)
        frozen[str(index)] = method.init_leaves(rng, config, params)
    return {FROZEN: frozen, **self.trained.init_leaves(rng, config, params)}

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'sequential',
            'stack': [m.file_fields(config) for m in self._chain()]}

  def _delta(self, p, r, f, site):
    """Σ_i s_i · A_i(u_i) over the adapters at `site` (f_n − f), or None if none acts there."""
    delta = None
    leaves = [p[FROZEN][str(i)] for i in range(len(self.stacked))] + [p]
    for method, own in zip(self._chain(), leaves):
      if site not in method.sites:
        continue
      current = f if delta is None else f + delta
      out = method.adapter(own[site], mlp_adapter_input(method.placement, r, current))
      delta = out if delta is None else delta + out
    return delta

  def attn_delta(self, p, r, f):
    return self._delta(p, r, f, 'attn')

  def mlp_delta(self, p, r, f):
    return self._delta(p, r, f, 'mlp')
