"""The data sets, each a declarative spec that maps a file's rows to `prompt`/`response`.

A spec names the file format, the file of each split (relative to the data
folder, `config.data_dir`), and two `str.format` templates over a
row's fields, after label fields are mapped to their words. Field values are
stripped of surrounding whitespace first (SST-2 sentences end with a space).

* SST-2: `Review: {sentence}\\nSentiment:` → ` negative` / ` positive` (label 0 / 1);
  splits train, dev, test (test is GLUE's validation set).
* GSM8K: `Question: {question}\\nAnswer:` → ` {answer}`; splits train, test.
* Tiny Shakespeare: language modelling, so the prompt is empty and each
  paragraph (a speech) is the response; train is the first 90% of the lines,
  test the last 10%.

Responses start with a space because the prompt and the response are tokenized
separately: the space belongs to the response's first word, as in the text.
"""

from __future__ import annotations

import dataclasses
import os
import string
from typing import Iterator, Mapping

from additive_jax.data.config import data_dir as resolve_data_dir
from additive_jax.data.readers import READERS

# SST-2's prompt and its label words for labels 0 and 1.
SST2_PROMPT = 'Review: {sentence}\nSentiment:'
SST2_LABEL_WORDS = (' negative', ' positive')

@dataclasses.dataclass(frozen=True)
class Split:
  file: str                                  # relative to the data folder
  portion: tuple[float, float] = (0.0, 1.0)  # the fraction of the file's data lines it takes


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  name: str
  format: str                          # a key of readers.READERS
  splits: Mapping[str, Split]
  prompt: str                          # str.format template over the row's fields
  response: str
  labels: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

  def path(self, data_dir: str, split: str) -> str:
    if split not in self.splits:
      raise ValueError(f'{self.name} has no split {split!r} (splits: {", ".join(self.splits)})')
    return os.path.join(resolve_data_dir(data_dir), self.splits[split].file)

  def fields(self) -> set[str]:
    """The row fields the templates read."""
    return {name for template in (self.prompt, self.response)
            for _, name, _, _ in string.Formatter().parse(template) if name}


SST2 = SourceSpec(
    name='sst2', format='tsv',
    splits={'train': Split('sst2/train.tsv'), 'dev': Split('sst2/dev.tsv'),
            'test': Split('sst2/test.tsv')},
    prompt=SST2_PROMPT, response='{label}',
    labels={'label': dict(zip(('0', '1'), SST2_LABEL_WORDS))})

GSM8K = SourceSpec(
    name='gsm8k', format='jsonl',
    splits={'train': Split('gsm8k/train.jsonl'), 'test': Split('gsm8k/test.jsonl')},
    prompt='Question: {question}\nAnswer:', response=' {answer}')

TINY_SHAKESPEARE = SourceSpec(
    name='tinyshakespeare', format='text',
    splits={'train': Split('tinyshakespeare/input.txt', (0.0, 0.9)),
            'test': Split('tinyshakespeare/input.txt', (0.9, 1.0))},
    prompt='', response='{text}')

SOURCES = {spec.name: spec for spec in (SST2, GSM8K, TINY_SHAKESPEARE)}


def source_spec(name: str) -> SourceSpec:
  if name not in SOURCES:
    raise ValueError(f'unknown data source {name!r} (known: {", ".join(SOURCES)})')
  return SOURCES[name]


def read_split(spec: SourceSpec, data_dir: str, split: str) -> Iterator[tuple[int, str, str]]:
  """(line, prompt, response) for every row of the split, in file order."""
  path = spec.path(data_dir, split)
  needed = spec.fields()
  rows = 0
  for line, row in READERS[spec.format](path, spec.splits[split].portion):
    missing = needed - row.keys()
    if missing:
      raise ValueError(f'{path}:{line}: missing field {", ".join(sorted(missing))} '
                       f'(the row has {", ".join(row) or "none"})')
    not_text = sorted(name for name in needed if not isinstance(row[name], str))
    if not_text:
      raise ValueError(f'{path}:{line}: field {not_text[0]} is {row[not_text[0]]!r}, not text')
    values = {name: row[name].strip() for name in needed}
    for name, words in spec.labels.items():
      if values[name] not in words:
        raise ValueError(f'{path}:{line}: {name} {values[name]!r} is not one of '
                         f'{", ".join(map(repr, words))}')
      values[name] = words[values[name]]
    rows += 1
    yield line, spec.prompt.format(**values), spec.response.format(**values)
  if not rows:
    raise ValueError(f'{path}: no rows in split {split!r}')
