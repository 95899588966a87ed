"""The default experiment config: every key an experiment may change, one comment each.

Experiment files in `configs/` start from `default_config()`, set what differs,
and lock the result, so `--config.some_typo=1` fails before anything runs.
"""

from __future__ import annotations

import ml_collections

from additive_jax.data.config import data_config
from additive_jax.train.optimizer import DEFAULT_LEARNING_RATES, method_settings

# Method presets: the name an experiment's argument gives -> the constructor call.
METHODS = {
    'pfeiffer': "Bottleneck(dim=64, placement='pfeiffer')",
    'houlsby': "Bottleneck(dim=32, placement='houlsby')",
    'parallel': "Bottleneck(dim=64, placement='parallel', scale=4.0)",
    'ia3': 'IA3()',
    'lora': "LoRA(rank=8, alpha=16, targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'))",
    'prompt': 'PromptTuning(num_tokens=20)',
    'prefix': "PrefixTuning(num_tokens=20, init='vocab')",
    'ladder': 'LadderSide(reduction=8)',
}

# Logical axis of a base weight -> mesh axis. A size the mesh axis does not divide is
# replicated instead (mesh.shardings_for reports which).
RULES = (('layers', None), ('vocab', 'tensor'), ('embed', 'fsdp'), ('q_heads', 'tensor'),
         ('kv_heads', 'tensor'), ('head_dim', None), ('mlp', 'tensor'))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'smollm2-135m-instruct'  # HF checkpoint dir, .gguf file, or the embedded default
  c.dtype = 'float32'                # compute dtype; 'bfloat16' on accelerators
  c.param_dtype = 'float32'          # storage dtype of the frozen base
  c.remat = 'none'                   # 'none' | 'full' | 'dots': activation checkpointing policy
  c.peft = (METHODS['pfeiffer'],)    # the methods, as constructor calls
  # every method's optimizer settings (learning_rate, schedule, warmup_steps, weight_decay); a run
  # uses those of its methods: `--config.optimizer.lora.learning_rate=2e-4`
  c.optimizer = ml_collections.ConfigDict({key: method_settings(key) for key in DEFAULT_LEARNING_RATES})
  c.clip_norm = 1.0                  # global gradient-norm clip over the trainable partition; 0: off
  c.data = data_config()
  c.batch_size = 8                   # rows per optimizer step, over all processes
  c.seq_len = 256                    # tokens per row
  c.accumulation = 1                 # micro-batches per step (divides the rows of each device)
  c.num_steps = 200
  c.seed = 0                         # parameter init and data order
  c.log_every = 10
  c.eval_every = 100                 # eval loss on eval_batches of data.eval_split; 0: at the end only
  c.eval_batches = 16                # 0: the whole eval split
  c.checkpoint_every = 100
  c.keep_checkpoints = 2             # the latest N ...
  c.keep_best = 1                    # ... and the best N by eval loss
  c.accuracy_split = ''              # a classification split scored before and after ('' : none)
  c.accuracy_limit = 0               # score only its first N rows (0: all)
  c.mesh = (-1, 1, 1)                # (data, fsdp, tensor); -1 takes the remaining devices
  c.rules = RULES
  c.distributed = False              # jax.distributed.initialize() first (multi-host)
  return c


def with_methods(config: ml_collections.ConfigDict, *names: str) -> ml_collections.ConfigDict:
  """`config` training the preset methods `names` (keys of METHODS)."""
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise ValueError(f'unknown method preset {unknown}; presets: {", ".join(METHODS)}')
  config.peft = tuple(METHODS[n] for n in names)
  return config


def parse_arg(arg: str | None, **defaults) -> dict:
  """big_vision-style argument: 'lora,runlocal' -> {'methods': ('lora',), 'runlocal': True}."""
  words = [w for w in (arg or '').split(',') if w]
  flags = {w for w in words if w in defaults}
  methods = tuple(w for w in words if w not in defaults) or None
  return {**defaults, **{f: True for f in flags}, 'methods': methods}
