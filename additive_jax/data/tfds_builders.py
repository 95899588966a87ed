"""One TFDS builder, parameterized by a source declaration, and random access to its splits.

`DeclaredSource` (a `tfds.core.GeneratorBasedBuilder`) writes every split of a
spec as ArrayRecord files of text records, in file order: `{prompt, response,
line, column}` for a pair source, `{messages, line, column}` (the conversation as
JSON) for a conversation source; `line` and `column` point back into the source
file for error messages (column 0 but for a JSON array's rows, readers.Line).
A record's TFDS key is its row's index in the split, unique in every layout of
the file (a JSON array's rows may all start on line 1); a text TFDS cannot
encode is refused here, by file and line, as TFDS's own errors for both need
TensorFlow to print.
Templates are applied here, the tokenizer's template and tokenization are not
(they belong to the run). Nothing is downloaded: the generator reads the
declared files. TensorFlow is not needed, neither to prepare (TFDS serializes
with its own copy of the `tf.train.Example` protos) nor to read
(`builder.as_data_source`, which is what `tfds.data_source` returns, decodes
with numpy).

Prepared data lives under `<cache>/<name>-<fingerprint>/<name>/<version>/`, where
the fingerprint hashes the builder version, the resolved spec (every key of the
declaration) and the split files' bytes: a changed file, template or label word
gets a fresh folder, never a stale one. TFDS writes into an `incomplete.*` folder
and renames it into place as its last step, so a killed preparation leaves
nothing that looks valid and the next run prepares again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import types

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from additive_jax.data import sources
from additive_jax.data.config import cache_dir as additive_jax_cache_dir, data_dir
from additive_jax.data.readers import read_bytes

_VERSION = '1.2.0'


class DeclaredSource(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prepares the splits of `spec` from its files, relative to `source_dir`.

  TFDS names a builder's folder by its class, so each source name gets a subclass
  (`builder_class`); registration is skipped, as TFDS's own catalog has datasets
  named gsm8k and tiny_shakespeare (which download).
  """

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {'1.0.0': 'prompt/response records prepared from the local files',
                   '1.1.0': 'any declared source; conversations as {messages, line}',
                   _VERSION: 'keyed by the row index; the column of a JSON array row'}

  def __init__(self, *, spec: sources.SourceSpec, source_dir: str | None, **kwargs):
    self.spec, self.source_dir = spec, source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    if self.spec.messages:
      features = {'messages': tfds.features.Text(), 'line': np.int64, 'column': np.int64}
    else:
      features = {'prompt': tfds.features.Text(), 'response': tfds.features.Text(),
                  'line': np.int64, 'column': np.int64}
    kind = 'conversations' if self.spec.messages else 'prompt/response pairs'
    return tfds.core.DatasetInfo(
        builder=self, description=f'{self.spec.name} as {kind}, read from its declared files',
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True)  # record i is the i-th row of the split

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {split: self._generate_examples(split) for split in self.spec.splits}

  def _generate_examples(self, split):
    path = self.spec.path(self.source_dir, split)
    for index, row in enumerate(sources.read_rows(self.spec, self.source_dir, split)):
      if self.spec.messages:
        texts = {'messages': json.dumps(list(row.messages), ensure_ascii=False)}
      else:
        texts = {'prompt': row.prompt, 'response': row.response}
      for name, text in texts.items():
        _check_encodes(text, f'{path}:{row.line}: {name}')
      yield index, {**texts, 'line': int(row.line), 'column': getattr(row.line, 'column', 0)}


def _check_encodes(text: str, where: str) -> None:
  """A lone UTF-16 surrogate (a JSON escape such as \\ud800 without its pair) is a str that
  UTF-8 cannot encode; TFDS would fail on it after reading the whole split."""
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as err:
    raise ValueError(f'{where} holds {text[err.start]!r} at character {err.start + 1}, half of '
                     'a UTF-16 surrogate pair (a \\u escape without its other half), which is '
                     'not text') from None


@functools.cache
def builder_class(name: str) -> type[DeclaredSource]:
  """The builder of the source `name` (TFDS's folder name is the class's `name`)."""
  return types.new_class(f'DeclaredSource_{name}', (DeclaredSource,),
                         {'skip_registration': True},
                         lambda namespace: namespace.update(name=name, __module__=__name__))


def default_cache_dir() -> str:
  return os.path.join(additive_jax_cache_dir(), 'tfds')


def fingerprint(spec: sources.SourceSpec, source_dir: str | None) -> str:
  """16 hex digits of SHA-256 over the builder version, the spec and the split files' bytes."""
  digest = hashlib.sha256(f'{_VERSION} {spec!r}'.encode())
  files = {}  # path -> the first split read from it (a held-out split shares the train file)
  for split in spec.splits:
    files.setdefault(spec.path(source_dir, split), split)
  for path in sorted(files):
    if not epath.Path(path).exists():
      raise FileNotFoundError(
          f'{path}: no such data file (split {files[path]!r} of source {spec.name!r}; a relative '
          f'file of {spec.key}.files is in the data folder {data_dir(source_dir)})')
    digest.update(read_bytes(path))
  return digest.hexdigest()[:16]


def prepared_builder(source, source_dir: str | None, cache_dir: str | None = None):
  """The builder of `source` (a declaration, a built-in's name, or a spec), its splits
  prepared (once) from `source_dir` under `cache_dir`."""
  spec = sources.source_spec(source)
  prepared_dir = os.path.join(cache_dir or default_cache_dir(),
                              f'{spec.name}-{fingerprint(spec, source_dir)}')
  builder = builder_class(spec.name)(spec=spec, source_dir=source_dir, data_dir=prepared_dir,
                                     file_format='array_record')
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except ImportError as err:
    # TFDS prints some of its own errors with TensorFlow; the generator checks what it can, so
    # this is a case it missed: one line, not TensorFlow's missing module.
    raise ValueError(f'{spec.name}: TFDS failed to write the prepared rows of '
                     f'{", ".join(sorted({spec.path(source_dir, s) for s in spec.splits}))} '
                     f'({" ".join(str(err).split())[:300]})') from None
  except OSError:
    # Several processes sharing a cache folder may prepare at once; the first
    # rename wins and the others' renames fail. Their data is the same.
    if not builder.is_prepared():
      raise
  return builder


def data_source(source, split: str, source_dir: str | None, cache_dir: str | None = None):
  """Random access to a split's records (bytes texts and an int line), see the docstring."""
  spec = sources.source_spec(source)
  spec.path(source_dir, split)  # an unknown split fails here, clearly
  return prepared_builder(spec, source_dir, cache_dir).as_data_source(split=split)
