"""The default experiment config: every key an experiment may change, one comment each.

Experiment files in `configs/` start from `default_config()`, set what differs,
and lock the result, so `--config.some_typo=1` fails before anything runs.

`config.peft` has one entry per trained method, under the method's key: its
fields and its own `optimizer` block, each overridable on the command line
(`--config.peft.bottleneck.dim=128`, `--config.peft.lora.optimizer.learning_rate=2e-4`).
A preset of a method's class (`Bottleneck.presets['houlsby']`, ...) fills an
entry; the methods act in the order of their keys.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from additive_jax.data.config import data_config
from additive_jax.peft.registry import combinations, field_types, presets
from additive_jax.train.optimizer import method_settings

# the built-in classification sources a config's argument may name as its task (task_run)
TASKS = ('sst2', 'trec')
# Logical axis of a base weight or an activation -> mesh axis. A weight size the mesh axis does
# not divide is replicated instead (mesh.shardings_for reports which). Activations keep their
# batch split over data × fsdp in every layer, so FSDP gathers weights, never activations.
RULES = (('layers', None), ('vocab', 'tensor'), ('embed', 'fsdp'), ('q_heads', 'tensor'),
         ('kv_heads', 'tensor'), ('head_dim', None), ('mlp', 'tensor'),
         ('activation_batch', ('data', 'fsdp')), ('activation_length', None),
         ('activation_embed', None), ('activation_vocab', None))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'smollm2-135m-instruct'  # HF checkpoint dir, .gguf file, or the embedded default
  c.dtype = 'auto'                   # compute dtype: 'auto' is bfloat16 on GPU/TPU, float32 on CPU
  c.param_dtype = 'float32'          # storage dtype of the frozen base
  # the frozen base in blocks of 8 or 4 bits, widened where a product reads it (model/quant.py):
  # 'none' | 'int8' | 'int4' | 'nf4' | 'gguf' (a GGUF file's own Q8_0/Q4_0/Q4_1 blocks)
  c.base_quant = 'none'
  c.base_quant_block = 0             # weights per block; 0: the mode's (32; nf4: 64)
  c.remat = 'none'                   # 'none' | 'full' | 'dots': activation checkpointing policy
  c.attention = 'auto'               # 'auto' | 'xla' | 'cudnn' | 'splash' | 'pallas' (model/attention.py)
  # logits only at the loss positions, this many a row: 'auto' (from the data) | 'all' | a number
  c.loss_positions = 'auto'
  c.peak_tflops = 0.0                # one device's peak for MFU; 0: the datasheet's (train/flops.py)
  # the trained methods: one entry per key, its fields and its optimizer (see with_methods)
  c.peft = method_entries('pfeiffer')
  # adapter files or run folders the trainables start from, averaged (train/start_from.py);
  # with config.peft empty, their methods are the run's; () starts from the methods' init
  c.start_from = ()
  c.start_weights = ()               # their weights in the average; (): equal
  c.clip_norm = 1.0                  # global gradient-norm clip over the trainable partition; 0: off
  # a NaN or infinite loss or gradient norm: 'stop' the run (the last good checkpoint kept) or
  # 'skip' that step's update inside the step, counted in the metrics
  c.nonfinite = 'stop'
  c.data = data_config()
  c.batch_size = 8                   # rows per optimizer step, over all processes
  c.seq_len = 256                    # tokens per row
  c.accumulation = 1                 # micro-batches per step (divides the rows of each device)
  c.num_steps = 200                  # 0: nothing trains; the start_from adapters are scored
  c.seed = 0                         # parameter init and data order
  c.log_every = 10
  c.eval_every = 100                 # eval loss on eval_batches of data.eval_split; 0: at the end only
  c.eval_batches = 16                # 0: the whole eval split
  c.checkpoint_every = 100
  c.keep_checkpoints = 2             # the latest N ...
  c.keep_best = 1                    # ... and the best N by eval loss
  # the task metric scored before and after training: accuracy | exact_match | perplexity ('': none)
  c.test_metric = ''
  c.test_split = ''                  # ... on this split
  c.test_limit = 0                   # ... a fixed-seed subset of this many rows (0: all)
  c.test_before = True               # ... also before training (False: after it only)
  # ... after training, of the 'last' state or the 'best' checkpoint by the eval metric
  c.test_checkpoint = 'last'
  # scored with the eval loss every eval_every on data.eval_split, the best checkpoint kept by it
  # ('': by the eval loss)
  c.eval_metric = ''
  c.eval_metric_limit = 0            # a fixed-seed subset of this many rows (0: all)
  c.answer_regex = ''                # exact_match: the answer's regex ('': GSM8K's number after ####)
  c.max_new_tokens = 256             # exact_match: the generation budget
  c.mesh = (-1, 1, 1)                # (data, fsdp, tensor); -1 takes the remaining devices
  c.rules = RULES
  c.distributed = False              # jax.distributed.initialize() first (multi-host)
  return c


def method_entries(*names: str) -> ml_collections.ConfigDict:
  """`config.peft` for the presets or combinations `names` (peft/combinations.py): per method
  key, every field of the method (the preset's value, else the field's default) and an
  `optimizer` block of its settings."""
  known, combined = presets(), combinations()
  unknown = [n for n in names if n not in known and n not in combined]
  if unknown:
    raise ValueError(f'unknown method preset {unknown}; presets: {", ".join(known)}; '
                     f'combinations: {", ".join(combined)}')
  entries = {}
  for name in names:
    for cls, chosen in combined.get(name, (known.get(name),)):
      if cls.key in entries:
        raise ValueError(f'presets {entries[cls.key][0]!r} and {name!r} both configure the '
                         f'{cls.key!r} method; a run trains each method once')
      entries[cls.key] = (name, cls, chosen)
  return ml_collections.ConfigDict(
      {key: _entry(cls, chosen) for key, (_, cls, chosen) in entries.items()})


def _entry(cls, chosen: dict) -> ml_collections.ConfigDict:
  entry = ml_collections.ConfigDict()
  for name, (default, kind) in field_types(cls).items():
    value = chosen.get(name, default)
    if value is None:  # typed, so that the command line can set it
      entry[name] = ml_collections.config_dict.placeholder(kind)
    else:
      entry[name] = kind(value) if kind in (int, float) else value
  entry.optimizer = method_settings(cls, chosen.get('optimizer'))  # a combination's own rates
  return entry


def entries_of(methods) -> ml_collections.ConfigDict:
  """`config.peft` for method objects (`aj.peft.Bottleneck(dim=8)`, ...): each entry holds the
  method's fields as set and its class's optimizer settings."""
  return ml_collections.ConfigDict(
      {m.key: _entry(type(m), {f.name: getattr(m, f.name) for f in dataclasses.fields(m)})
       for m in methods})


def with_methods(config: ml_collections.ConfigDict, *names: str) -> ml_collections.ConfigDict:
  """`config` training the preset methods `names` (e.g. 'pfeiffer', 'lora')."""
  config.peft = method_entries(*names)
  return config


def task_run(c: ml_collections.ConfigDict, task: str, runlocal: bool = False
             ) -> ml_collections.ConfigDict:
  """`c` set to the quickstart's run on a built-in classification task of TASKS: train on its
  train split, the eval loss on dev, 60 steps of 8 packed rows of 128 tokens, accuracy on
  test before and after; `runlocal` shrinks it to a smoke test."""
  c.data.source.name = task  # the built-in declaration (additive_jax/data/builtins.py)
  c.data.split, c.data.eval_split = 'train', 'dev'
  c.batch_size, c.seq_len, c.num_steps = 8, 128, 60
  c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 5, 30, 4, 30
  c.test_metric, c.test_split = 'accuracy', 'test'
  if runlocal:
    c.batch_size, c.seq_len, c.num_steps = 2, 64, 4
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 2, 1, 2
    c.test_limit = 16
  return c


def task_arg(arg: str | None, config_file: str, methods: bool = True) -> dict:
  """`parse_arg` of a config taking a task of TASKS (default sst2) and `runlocal`, and method
  presets unless `methods` is False: {'task', 'runlocal', 'methods'}."""
  args = parse_arg(arg, runlocal=False, **dict.fromkeys(TASKS, False))
  named = [task for task in TASKS if args[task]]
  if len(named) > 1:
    raise ValueError(f'{config_file}: name one task of {", ".join(TASKS)}, got {", ".join(named)}')
  if args['methods'] and not methods:
    raise ValueError(f'{config_file} takes a task of {", ".join(TASKS)} and runlocal, not '
                     f'{", ".join(args["methods"])}')
  return {'task': named[0] if named else 'sst2', 'runlocal': args['runlocal'],
          'methods': args['methods']}


def parse_arg(arg: str | None, **defaults) -> dict:
  """big_vision-style argument: 'lora,runlocal' -> {'methods': ('lora',), 'runlocal': True}."""
  words = [w for w in (arg or '').split(',') if w]
  flags = {w for w in words if w in defaults}
  methods = tuple(w for w in words if w not in defaults) or None
  return {**defaults, **{f: True for f in flags}, 'methods': methods}
