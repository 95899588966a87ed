"""The optimizer of the trainable partition: one AdamW per method, global clipping.

`optax.multi_transform` labels every leaf of `variables['peft']` with its
method's key, so each method has its own learning rate, schedule and weight
decay. The state holds Adam's two moments per trainable leaf (plus step
counters) and nothing for the frozen base, which never enters the optimizer.
Clipping by global norm runs first, over the whole trainable partition.
Gradient accumulation happens inside the train step, not with
`optax.MultiSteps` (which would keep a third copy of the trainables).
"""

from __future__ import annotations

import jax
import optax

# Learning rates that train well on SmolLM2-135M with a few hundred steps; the
# literature's ranges: adapters 1e-4..1e-3, (IA)3 ~3e-3, LoRA ~2e-4..1e-3,
# prompt tuning orders of magnitude higher (Lester et al. use 0.3 with Adafactor).
SCHEDULES = ('cosine', 'constant')  # cosine: linear warmup, then cosine decay to zero
DEFAULT_LEARNING_RATES = {'bottleneck': 1e-3, 'ia3': 3e-3, 'lora': 5e-4, 'prompt': 3e-2,
                          'prefix': 5e-3, 'ladder': 3e-3}


def method_settings(key: str, overrides=None) -> dict:
  """One method's optimizer settings: the defaults, then the overrides (a dict or ConfigDict)."""
  return {'learning_rate': DEFAULT_LEARNING_RATES[key],
          'schedule': 'cosine',    # one of SCHEDULES
          'warmup_steps': 10,
          'weight_decay': 0.0,
          **(overrides or {})}


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
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """`settings_by_method[key]`: that method's `method_settings`."""
  transforms = {
      key: optax.adamw(schedule(settings_by_method[key], total_steps),
                       weight_decay=settings_by_method[key]['weight_decay'])
      for key in method_keys}
  labels = lambda peft: {key: jax.tree.map(lambda _, k=key: k, tree) for key, tree in peft.items()}
  chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  return optax.chain(*chain, optax.multi_transform(transforms, labels))


def run_optimizer(config, methods) -> tuple[optax.GradientTransformation, dict]:
  """(optimizer, each method's settings) of an experiment config (a ConfigDict, or the dict a
  checkpoint keeps): one definition for the run and for whatever reads its checkpoints."""
  settings = {m.key: method_settings(m.key, config['optimizer'].get(m.key)) for m in methods}
  return make_optimizer(list(settings), settings, config['num_steps'], config['clip_norm']), settings


def learning_rates(settings_by_method, total_steps: int, step: int) -> dict[str, float]:
  """Each method's learning rate at `step` (for logging)."""
  return {key: float(schedule(s, total_steps)(step)) for key, s in settings_by_method.items()}
