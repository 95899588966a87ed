"""`config.data`: the keys an experiment changes about its data, and where files live.

The batch size, sequence length and shuffle seed are not here: the trainer owns
them (the model and the step need them too) and passes them to
`make_train_iterator`.

The data folder (the source files) is, in this order: `config.data.data_dir`
when set, else `$ADDITIVE_JAX_DATA`, else `../shared/data` beside the working
directory. The cache folder (the embedded model, prepared TFDS data under
`tfds/`) is `$ADDITIVE_JAX_CACHE`, default `~/.cache/additive_jax`.
"""

from __future__ import annotations

import os

import ml_collections

DATA_ENV = 'ADDITIVE_JAX_DATA'
CACHE_ENV = 'ADDITIVE_JAX_CACHE'


def data_dir(configured: str | None = None) -> str:
  """The data folder: `configured` (config.data.data_dir), $ADDITIVE_JAX_DATA, or
  ../shared/data beside the working directory."""
  if configured:
    return configured
  return os.path.abspath(os.environ.get(DATA_ENV) or os.path.join(os.pardir, 'shared', 'data'))


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.expanduser('~/.cache/additive_jax')


def data_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source = 'sst2'          # 'sst2' | 'gsm8k' | 'tinyshakespeare' (data/sources.py)
  config.split = 'train'          # the split make_train_iterator reads
  config.eval_split = 'dev'       # the split make_eval_batches reads (SST-2 dev/test; else test)
  config.template = 'plain'       # 'plain': prompt + response + EOS | 'chat': the tokenizer's
  config.packing = True           # pack examples into rows (segment_ids) | pad one per row
  config.over_long = 'truncate'   # 'truncate' the prompt from the left | 'drop' | 'error'
  config.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
  # the source files; unset: $ADDITIVE_JAX_DATA, else ../shared/data beside the working directory
  config.data_dir = ml_collections.config_dict.placeholder(str)
  return config
