"""The optimizer of the trainable partition: one AdamW per method, global clipping.

`optax.multi_transform` labels every leaf of `variables['peft']` with its
method's key, so each method has its own learning rate, schedule and weight
decay. The state holds Adam's two moments per trainable leaf (plus step
counters) and nothing for the frozen base, which never enters the optimizer.
Clipping by global norm runs first, over the whole trainable partition.
A method's frozen leaves (`Method.frozen_keys`: adapters it loads, not trains) are
labelled apart and get `optax.set_to_zero()`: no Adam state, no weight decay, no update.
Gradient accumulation happens inside the train step, not with
`optax.MultiSteps` (which would keep a third copy of the trainables).
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ('cosine', 'constant')
FROZEN = '(frozen)'  # the label of frozen leaves: no method key has parentheses  # cosine: linear warmup, then cosine decay to zero
# Every method's settings unless its class says otherwise (`Method.optimizer_defaults`: each
# method's learning rate, from the literature's ranges and what trains well on SmolLM2-135M
# in a few hundred steps).
SETTINGS = {'learning_rate': 1e-3,
            'schedule': 'cosine',    # one of SCHEDULES
            'warmup_steps': 10,
            'weight_decay': 0.0}


def method_settings(method_class, overrides=None) -> dict:
  """One method's optimizer settings: the shared ones, its class's defaults, then the
  overrides (a dict or ConfigDict, e.g. its config entry's `optimizer` block)."""
  return {**SETTINGS, **method_class.optimizer_defaults, **(overrides or {})}


def schedule(settings, total_steps: int) -> optax.Schedule:
  if settings['schedule'] == 'constant':
    return optax.constant_schedule(settings['learning_rate'])
  if settings['schedule'] == 'cosine':
    warmup = min(settings['warmup_steps'], max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, settings['learning_rate'], warmup,
                                              max(total_steps, warmup + 1))
  raise ValueError(f"optimizer schedule must be one of {', '.join(SCHEDULES)}, "
                   f"got {settings['schedule']!r}")


def make_optimizer(method_keys, settings_by_method, total_steps: int,
                   clip_norm: float | None = 1.0,
                   skip_nonfinite: bool = False,
                   frozen_keys: dict[str, tuple[str, ...]] | None = None
                   ) -> optax.GradientTransformation:
  """`settings_by_method[key]`: that method's `method_settings`. `skip_nonfinite`: an update
  whose gradients hold a NaN or an infinity is not applied (`optax.apply_if_finite`, whose
  counters are the only state it adds), however many come in a row. `frozen_keys[key]`: the
  top-level keys of that method's subtree that never train (`Method.frozen_keys`)."""
  frozen_keys = {key: names for key, names in (frozen_keys or {}).items() if names}
  transforms = {
      key: optax.adamw(schedule(settings_by_method[key], total_steps),
                       weight_decay=settings_by_method[key]['weight_decay'])
      for key in method_keys}
  if frozen_keys:  # only then: a run without frozen leaves keeps its optimizer state's tree
    transforms[FROZEN] = optax.set_to_zero()

  def label(key, tree):
    if key not in frozen_keys:
      return jax.tree.map(lambda _: key, tree)
    return {name: jax.tree.map(lambda _: FROZEN if name in frozen_keys[key] else key, sub)
            for name, sub in tree.items()}

  labels = lambda peft: {key: label(key, tree) for key, tree in peft.items()}
  chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  optimizer = optax.chain(*chain, optax.multi_transform(transforms, labels))
  return optax.apply_if_finite(optimizer, 2**31 - 1) if skip_nonfinite else optimizer


def run_optimizer(config, methods) -> tuple[optax.GradientTransformation, dict]:
  """(optimizer, each method's settings) of an experiment config (a ConfigDict, or the dict a
  checkpoint keeps): one definition for the run and for whatever reads its checkpoints."""
  settings = {m.key: method_settings(type(m), config['peft'][m.key]['optimizer'])
              for m in methods}
  skip = config.get('nonfinite', 'stop') == 'skip'  # a checkpoint saved before the key: 'stop'
  return make_optimizer(list(settings), settings, config['num_steps'], config['clip_norm'],
                        skip, {m.key: getattr(m, 'frozen_keys', ()) for m in methods}), settings


def learning_rates(settings_by_method, total_steps: int, step: int) -> dict[str, float]:
  """Each method's learning rate at `step` (for logging)."""
  return {key: float(schedule(s, total_steps)(step)) for key, s in settings_by_method.items()}
