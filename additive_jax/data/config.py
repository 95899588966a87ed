"""`config.data`: the keys an experiment changes about its data, and where files live.

The batch size, sequence length and shuffle seed are not here: the trainer owns
them (the model and the step need them too) and passes them to
`make_train_iterator`.

`config.data.source` declares the data set (`source_config()`): its files, their
format, the templates that turn a row into a prompt and a response (or the field
that holds a chat conversation), label words, a held-out split. A built-in
source is named by `name` and fills every key left unset (data/builtins.py);
`data/declarations.py` checks a declaration and resolves it.

`config.data.mixture` trains on several declared sources at once: one entry per
source, each a source declaration with a `weight` (`mixture_entry()`); empty, the
run trains on `config.data.source` alone. `config.data.source` stays the source
the run evaluates and tests (data/mixture.py).

The data folder (the source files) is, in this order: `config.data.data_dir`
when set, else `$ADDITIVE_JAX_DATA`, else `../shared/data` beside the working
directory. A relative file of a declaration is relative to it; an absolute path
or a URL (`gs://...`) is taken as it is. The cache folder (the embedded model,
prepared TFDS data under `tfds/`) is `$ADDITIVE_JAX_CACHE`, default
`~/.cache/additive_jax`.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections.config_dict import placeholder

DATA_ENV = 'ADDITIVE_JAX_DATA'
CACHE_ENV = 'ADDITIVE_JAX_CACHE'
# The split keys of `source.files`: a locked config gains no key from the command line, so
# every split a declaration may name from there exists up front.
SPLIT_KEYS = ('train', 'dev', 'test')


def is_url(path: str) -> bool:
  """Whether `path` names a file system by scheme (gs://, s3://): taken as it is, never joined."""
  return '://' in path


def data_dir(configured: str | None = None) -> str:
  """The data folder: `configured` (config.data.data_dir), $ADDITIVE_JAX_DATA, or
  ../shared/data beside the working directory."""
  if configured:
    return configured
  folder = os.environ.get(DATA_ENV) or os.path.join(os.pardir, 'shared', 'data')
  return folder if is_url(folder) else os.path.abspath(folder)


def data_dir_origin(configured: str | None = None) -> str:
  """The data folder, which of its three sources gave it, and all three: what a missing data
  file's error says."""
  if configured:
    origin = '--config.data.data_dir'
  elif os.environ.get(DATA_ENV):
    origin = f'${DATA_ENV}'
  else:
    origin = 'the default'
  return (f'the data folder (--config.data.data_dir, else ${DATA_ENV}, else ../shared/data '
          f'beside the working directory) is {data_dir(configured)}, from {origin}')


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.expanduser('~/.cache/additive_jax')


def source_config(name: str = 'sst2') -> ml_collections.ConfigDict:
  """A source declaration: `name` and typed placeholders. A key left unset (None, or an empty
  `labels`) takes the value of the built-in source `name`, if there is one."""
  s = ml_collections.ConfigDict()
  s.name = name                      # a built-in (sst2, gsm8k, trec, tinyshakespeare), or your own
  s.format = placeholder(str)        # jsonl | json | tsv | csv | text | paragraphs | parquet
  # the file of each split: relative to the data folder, absolute, or a URL (gs://...)
  s.files = ml_collections.ConfigDict({key: placeholder(str) for key in SPLIT_KEYS})
  s.columns = placeholder(tuple)     # tsv/csv without a header line: the column names, in order
  # templates over the row's fields: str.format ('{field}'), or Jinja2 when they hold {{ or {%
  s.prompt = placeholder(str)
  s.response = placeholder(str)
  s.labels = ml_collections.ConfigDict()  # {field: {value: label word}}: classification
  s.messages = placeholder(str)      # the field of a chat conversation [{role, content}, ...]
  # a split cut from the end of the train file: held_out.fraction of its rows
  s.held_out = ml_collections.ConfigDict({'split': placeholder(str),
                                          'fraction': placeholder(float)})
  return s


def mixture_entry(name: str, weight: float = 1.0) -> ml_collections.ConfigDict:
  """A mixture entry: a source declaration (`source_config(name)`, every key settable) and its
  `weight`, relative to the other entries' (the weights are normalized)."""
  entry = source_config(name)
  entry.weight = float(weight)
  return entry


def data_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source = source_config()  # the data set's declaration (see source_config)
  # train on a weighted mixture of sources instead, each read at `split`: {entry:
  # mixture_entry(name, weight)}; empty: train on `source`, which evaluation reads either way
  config.mixture = ml_collections.ConfigDict()
  config.split = 'train'          # the split make_train_iterator reads
  config.eval_split = 'dev'       # the split make_eval_batches reads (SST-2 dev/test; else test)
  config.template = 'plain'       # 'plain': prompt + response + EOS | 'chat': the tokenizer's
  config.packing = True           # pack examples into rows (segment_ids) | pad one per row
  config.over_long = 'truncate'   # 'truncate' the context from the left | 'drop' | 'error'
  config.num_epochs = placeholder(int)  # None: repeat forever
  # the source files; unset: $ADDITIVE_JAX_DATA, else ../shared/data beside the working directory
  config.data_dir = placeholder(str)
  return config
