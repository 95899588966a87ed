"""`config.data`: the keys an experiment changes about its data.

The batch size, sequence length and shuffle seed are not here: the trainer owns
them (the model and the step need them too) and passes them to
`make_train_iterator`. Prepared TFDS data goes under `$ADDITIVE_JAX_CACHE/tfds`
(default `~/.cache/additive_jax/tfds`); the functions take `cache_dir=` to put it
elsewhere.
"""

from __future__ import annotations

import ml_collections

from additive_jax.data.sources import DEFAULT_DATA_DIR


def data_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source = 'sst2'          # 'sst2' | 'gsm8k' | 'tinyshakespeare' (data/sources.py)
  config.split = 'train'          # the split make_train_iterator reads
  config.eval_split = 'dev'       # the split make_eval_batches reads (SST-2 dev/test; else test)
  config.template = 'plain'       # 'plain': prompt + response + EOS | 'chat': the tokenizer's
  config.packing = True           # pack examples into rows (segment_ids) | pad one per row
  config.over_long = 'truncate'   # 'truncate' the prompt from the left | 'drop' | 'error'
  config.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
  config.data_dir = DEFAULT_DATA_DIR  # the source files (../shared/data beside the checkout)
  return config
