"""`SourceSpec`: a source declaration resolved and checked (data/declarations.py makes one).

A spec says where each split's rows are (a file, and the fraction of its rows the
split takes), how the file is read (`format`, `columns`), and what a row becomes:

* a (prompt, response) pair: two templates over the row's fields, after each
  label field is mapped to its word (`labels`); field values are stripped of
  surrounding whitespace first (SST-2 sentences end with a space);
* or, with `messages`, the chat conversation held in that field, rendered by the
  tokenizer's chat template with the loss on the assistant turns.

Its `repr` is part of the prepared data's fingerprint: two specs that read or
render differently never share prepared data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping

from etils import epath

from additive_jax.data.config import data_dir as resolve_data_dir, is_url
from additive_jax.data.render import Template


@dataclasses.dataclass(frozen=True)
class Split:
  file: str                                  # relative to the data folder, absolute, or a URL
  portion: tuple[float, float] = (0.0, 1.0)  # the fraction of the file's rows it takes


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  name: str
  format: str                          # a key of readers.READERS
  splits: Mapping[str, Split]
  prompt: str = ''                     # templates over the row's fields (data/render.py)
  response: str = ''
  labels: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
  columns: tuple[str, ...] = ()        # tsv/csv without a header: the column names
  messages: str = ''                   # the field of a chat conversation; '' for pairs
  # the declaration's config key, which errors name; not part of what the spec reads or renders,
  # so out of its repr (the prepared data's fingerprint) and its equality
  key: str = dataclasses.field(default='config.data.source', repr=False, compare=False)

  def path(self, data_dir: str | None, split: str) -> str:
    """The split's file: a relative one joined to the data folder (see data/config.py)."""
    if split not in self.splits:
      raise ValueError(f'{self.name} has no split {split!r} (splits: {", ".join(self.splits)})')
    file = self.splits[split].file
    if is_url(file) or os.path.isabs(file):
      return file
    return os.fspath(epath.Path(resolve_data_dir(data_dir)) / file)

  @functools.cached_property
  def templates(self) -> tuple[Template, Template]:
    """The (prompt, response) templates, compiled once."""
    return (Template(self.prompt, f'{self.key}.prompt'),
            Template(self.response, f'{self.key}.response'))

  def fields(self) -> set[str]:
    """The row fields a pair is made of: those the templates read."""
    prompt, response = self.templates
    return set(prompt.fields | response.fields)

  @property
  def label_field(self) -> str | None:
    """The field of a classification source (one label map), else None."""
    return next(iter(self.labels)) if len(self.labels) == 1 else None
