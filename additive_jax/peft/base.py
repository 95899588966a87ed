"""What a PEFT method is: the model's site hooks plus everything else about the method.

A method is one frozen dataclass in one file. Besides the hooks the model calls
(additive_jax/model/hooks.py), its class says

  key                 its subtree of variables['peft'] and its config entry (`config.peft.<key>`)
  presets             named settings an experiment picks by name (`configs/sst2.py:houlsby`)
  optimizer_defaults  its learning rate and anything else it trains best with (train/optimizer.py
                      fills in the rest)
  num_params          its parameter-count formula (tests check it against the leaves)
  shape_alike         a method with the same leaves whose init needs no tokenizer or forward
                      pass, for counting and export
  file_fields         its settings under the names adapter libraries use, for our adapter file
  mergeable, merge, unmerge, fold   whether and how it folds into the base weights, and its
                      inference form
  after_step, extra_loss   leaves a schedule sets after each step, and a term of its own added
                      to the training loss (AdapterFusion's temperature and regularization)
  stack_with, widen   how adapters of it trained apart share one stack (aj.peft.stack)
  frozen_keys         top-level keys of its subtree that never train (adapters it loads from
                      files, beside the leaves it trains); num_frozen_params counts them, and
                      frozen_sources, with_frozen say where they are read from (below)

Defining a subclass registers it (by constructor name and by key), so a method
written anywhere — a test file, a user's module — trains through the config,
counts, saves and loads like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

import jax

from additive_jax.model.hooks import Hooks

PyTree = Any

# Constructor name -> class, filled as each method class is defined.
_CLASSES: dict[str, type[Method]] = {}


def require_positive_int(method: str, name: str, value) -> None:
  """A constructor argument that counts something (a width, a rank, a number of tokens)."""
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'{method} {name} must be a positive integer, got {value!r}')


def require_number(method: str, name: str, value) -> None:
  """A real-valued constructor argument (a scale, an alpha); a bool is not one."""
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise ValueError(f'{method} {name} must be a number, got {value!r}')


@dataclasses.dataclass(frozen=True)
class Method(Hooks):
  """Base class of the methods in `aj.peft`; frozen so a model config can hash it."""

  presets: ClassVar[dict[str, dict]] = {}
  optimizer_defaults: ClassVar[dict] = {}
  mergeable: ClassVar[bool] = False     # can be folded into the frozen weights
  # Top-level keys of its subtree whose leaves never train: adapters loaded from files (the
  # adapters AdapterFusion fuses) or state a schedule sets. The optimizer gives them no state
  # and a zero update (optax.set_to_zero: no Adam moments, no weight decay), the train step
  # reads them under stop_gradient (no weight gradient; the global-norm clip never sees them),
  # and counts report them apart from the trainable leaves. They are part of variables['peft']
  # all the same: checkpoints and our adapter files keep them.
  frozen_keys: ClassVar[tuple[str, ...]] = ()

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    known = _CLASSES.get(cls.__name__)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__,
                                                                         cls.__qualname__):
      raise TypeError(f'a method named {cls.__name__} exists already ({known.__module__})')
    _CLASSES[cls.__name__] = cls

  def num_params(self, config) -> int:
    """Trainable parameters, from the method's formula (the leaves under `frozen_keys` not
    included)."""
    raise NotImplementedError(f'{type(self).__name__} defines no num_params')

  def num_frozen_params(self, config) -> int:
    """The leaves under `frozen_keys`, from the method's formula."""
    return 0

  def frozen_sources(self) -> tuple[str, ...]:
    """Where its frozen leaves are read from when it is initialized: adapter file directories
    (`peft/frozen.py`), or run folders, which the trainer reads (`train/frozen_sources.py`)."""
    return ()

  def with_frozen(self, paths: tuple[str, ...], methods: tuple[Method, ...]) -> Method:
    """This method reading its frozen adapters from `paths` (one per `frozen_sources` entry),
    which hold `methods`: what the trainer builds once it has read (and copied) the sources."""
    return self

  def token_matmul_params(self, config) -> int:
    """Trainable weights every token's activations are multiplied by: the 6 FLOPs per token
    and weight that MFU counts (`train/flops.py`). All of them by default, as for LoRA's and
    a bottleneck's matrices; a method of scaling or prepended vectors overrides it."""
    return self.num_params(config)

  def shape_alike(self) -> Method:
    """A method with the same leaf shapes whose `init_leaves` reads nothing but the base's
    shapes (no tokenizer, no forward pass): what counting and export trace."""
    return self

  def file_fields(self, config) -> dict:
    """Its settings under the names adapter libraries use, written to our adapter file for a
    reader (loading rebuilds the method from its constructor call alone)."""
    return {}

  def after_step(self, tree, step):
    """Its subtree after `step` optimizer steps, for a frozen leaf a schedule sets rather than
    the optimizer (AdapterFusion's temperature); the train step calls it after each update.
    The tree unchanged by default."""
    return tree

  def extra_loss(self, tree, step):
    """A scalar of its subtree added to the training loss at optimizer step `step`, once a step
    (AdapterFusion's regularization of its value matrices), or None (the default) for none."""
    return None

  def fold(self, tree, config):
    """(method, tree) for inference: a training-time reparameterization evaluated once (prefix
    tuning's MLP), the same logits for less work per call. Most methods have none."""
    return self, tree

  def stack_with(self, others, config) -> Method:
    """The method that holds this one and `others` (its class) in one stack of adapters:
    itself, when all are equal. A method whose width may differ between adapters (LoRA's
    rank, a bottleneck's dim) returns the widest, and `widen` pads its leaves with zeros."""
    different = [m for m in others if m != self]
    if different:
      raise ValueError(f'{self.call_string()} and {different[0].call_string()} cannot share a '
                       'stack of adapters: their leaves compute different functions')
    return self

  def widen(self, tree, wide: Method, config):
    """`tree` as leaves of `wide` (from `stack_with`) that compute the same function."""
    return tree

  def merge(self, tree, params, config, stage=None):
    """Params with this method folded in (only for `mergeable` methods); `stage` ('project',
    'mlp_hidden' or None for both) lets `aj.peft.merge` order several methods' folds."""
    raise NotImplementedError(f'{type(self).__name__} cannot be merged into the base weights')

  def unmerge(self, tree, params, config, stage=None):
    """The inverse of `merge`: the original params back."""
    raise NotImplementedError(f'{type(self).__name__} cannot be merged into the base weights')


def stop_frozen(methods, peft: dict) -> dict:
  """`peft` with each method's `frozen_keys` subtrees under stop_gradient: differentiated,
  the loss builds no gradient for them (the train step's view of the trainables)."""
  stopped = dict(peft)
  for method in methods:
    frozen = getattr(method, 'frozen_keys', ())
    if frozen and method.key in peft:
      stopped[method.key] = {name: jax.lax.stop_gradient(sub) if name in frozen else sub
                             for name, sub in peft[method.key].items()}
  return stopped


def advance(methods, peft: dict, step) -> dict:
  """`peft` after `step` optimizer steps: each method's `after_step` applied to its subtree."""
  scheduled = {m.key: m for m in methods if hasattr(m, 'after_step')}
  return {key: scheduled[key].after_step(tree, step) if key in scheduled else tree
          for key, tree in peft.items()}


def method_classes() -> dict[str, type[Method]]:
  """Constructor name -> class, for every method defined so far."""
  return dict(_CLASSES)
