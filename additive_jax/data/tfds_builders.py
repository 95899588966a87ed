"""TFDS builders that prepare each source from its local files, and random access to them.

One `tfds.core.GeneratorBasedBuilder` per source (SST-2, GSM8K, Tiny
Shakespeare) writes every split as ArrayRecord files of `{prompt, response,
line}` text records, in file order (`line` points back into the source file for
error messages). Nothing is downloaded: the generators read the files of
`source_dir`. TensorFlow is not needed, neither to prepare (TFDS serializes with
its own copy of the `tf.train.Example` protos) nor to read
(`builder.as_data_source`, which is what `tfds.data_source` returns, decodes
with numpy).

Prepared data lives under `<cache>/<source>-<fingerprint>/`, where the
fingerprint hashes the source files, the spec and the builder version: a changed
file or template gets a fresh folder, never a stale one. TFDS writes into an
`incomplete.*` folder and renames it into place as its last step, so a killed
preparation leaves nothing that looks valid and the next run prepares again.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from additive_jax.data import sources
from additive_jax.data.config import cache_dir as additive_jax_cache_dir

_VERSION = '1.0.0'


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prepares `SPEC`'s splits from the files in `source_dir`."""

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: 'prompt/response records prepared from the local files'}
  SPEC: sources.SourceSpec

  def __init__(self, *, source_dir: str, **kwargs):
    self.source_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self.SPEC.name} as prompt/response pairs, read from {self.source_dir}',
        features=tfds.features.FeaturesDict({
            'prompt': tfds.features.Text(), 'response': tfds.features.Text(), 'line': np.int64}),
        disable_shuffling=True)  # record i is the i-th row of the file

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {split: self._generate_examples(split) for split in self.SPEC.splits}

  def _generate_examples(self, split):
    for line, prompt, response in sources.read_split(self.SPEC, self.source_dir, split):
      yield line, {'prompt': prompt, 'response': response, 'line': line}


# Registration is skipped: TFDS's own catalog has datasets named gsm8k and
# tiny_shakespeare (which download), and these builders are always built directly.
class Sst2(LocalFilesBuilder, skip_registration=True):
  SPEC = sources.SST2


class Gsm8k(LocalFilesBuilder, skip_registration=True):
  SPEC = sources.GSM8K


class TinyShakespeare(LocalFilesBuilder, skip_registration=True):
  SPEC = sources.TINY_SHAKESPEARE


BUILDERS = {cls.SPEC.name: cls for cls in (Sst2, Gsm8k, TinyShakespeare)}


def default_cache_dir() -> str:
  return os.path.join(additive_jax_cache_dir(), 'tfds')


def fingerprint(spec: sources.SourceSpec, source_dir: str) -> str:
  """16 hex digits of SHA-256 over the builder version, the spec and the split files' bytes."""
  digest = hashlib.sha256(f'{_VERSION} {spec!r}'.encode())
  for path in sorted({spec.path(source_dir, split) for split in spec.splits}):
    with open(path, 'rb') as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]


def prepared_builder(source: str, source_dir: str, cache_dir: str | None = None):
  """The source's builder, its splits prepared (once) from `source_dir` under `cache_dir`."""
  spec = sources.source_spec(source)
  prepared_dir = os.path.join(cache_dir or default_cache_dir(),
                              f'{spec.name}-{fingerprint(spec, source_dir)}')
  builder = BUILDERS[spec.name](source_dir=source_dir, data_dir=prepared_dir,
                                file_format='array_record')
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except OSError:
    # Several processes sharing a cache folder may prepare at once; the first
    # rename wins and the others' renames fail. Their data is the same.
    if not builder.is_prepared():
      raise
  return builder


def data_source(source: str, split: str, source_dir: str, cache_dir: str | None = None):
  """Random access to a split's records `{'prompt': bytes, 'response': bytes, 'line': int}`."""
  sources.source_spec(source).path(source_dir, split)  # an unknown split fails here, clearly
  return prepared_builder(source, source_dir, cache_dir).as_data_source(split=split)
