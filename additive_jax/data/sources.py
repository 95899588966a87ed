"""A split's rows: read from the declared file, checked, and rendered as their examples.

    spec = source_spec(config.data.source)              # data/declarations.py
    for row in read_rows(spec, config.data.data_dir, 'test'):
      row.line, row.fields, row.prompt, row.response     # a pair source
      row.messages                                        # a conversation source

`Row.fields` are the row as the file has it (numbers as text, nothing stripped
or mapped), for a metric that compares against a field or a raw label;
`spec.labels` maps each label field's values to their words. `prompt` and
`response` are the templates' text: each field the templates read is stripped,
and each label field replaced by its word. `read_split` gives the
(line, prompt, response) of a pair source's rows.

Every error names the file and the line: a field the templates read that the
row lacks, or that is not text; a label value outside the map; a conversation
that is not one (data/chat.py); a split with no rows.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

from additive_jax.data.chat import check_conversation
from additive_jax.data.declarations import source_spec
from additive_jax.data.readers import read_rows as read_file_rows
from additive_jax.data.spec import SourceSpec, Split

__all__ = ['Row', 'SourceSpec', 'Split', 'read_rows', 'read_split', 'render_pair', 'source_spec']


@dataclasses.dataclass(frozen=True)
class Row:
  line: int                        # where the row starts: a readers.Line (Parquet: the row number)
  fields: Mapping[str, object]     # the row as read
  prompt: str = ''                 # a pair source's rendered texts
  response: str = ''
  messages: tuple = ()             # a conversation source's {role, content} messages


def render_pair(spec: SourceSpec, fields: Mapping[str, object], where: str) -> tuple[str, str]:
  """(prompt, response) of a row's raw `fields`; `where` (file:line) starts every error.

  To score the choices of a classification row, render it with each label value in turn:
  `render_pair(spec, {**row.fields, spec.label_field: value}, where)[1]`.
  """
  needed = spec.fields() | set(spec.labels)
  missing = needed - fields.keys()
  if missing:
    raise ValueError(f'{where}: missing field {", ".join(sorted(missing))} (the templates or '
                     f'labels read it; the row has {", ".join(fields) or "none"})')
  not_text = sorted(name for name in needed if not isinstance(fields[name], str))
  if not_text:
    raise ValueError(f'{where}: field {not_text[0]} is {fields[not_text[0]]!r}, not text')
  values = {name: fields[name].strip() for name in needed}
  for name, words in spec.labels.items():
    if values[name] not in words:
      raise ValueError(f'{where}: {name} {values[name]!r} is not one of '
                       f'{", ".join(map(repr, words))} ({spec.key}.labels)')
    values[name] = words[values[name]]
  prompt, response = spec.templates
  try:
    return prompt.render(values), response.render(values)
  except ValueError as err:
    raise ValueError(f'{where}: {err}') from None


def read_rows(spec: SourceSpec, data_dir: str | None, split: str) -> Iterator[Row]:
  """Every row of the split, in file order, checked and rendered."""
  path = spec.path(data_dir, split)
  rows = read_file_rows(spec.format, path, spec.columns, spec.splits[split].portion)
  if not rows:
    raise ValueError(f'{path}: no rows in split {split!r}')
  for line, fields in rows:
    where = f'{path}:{line}'
    if spec.messages:
      if spec.messages not in fields:
        raise ValueError(f'{where}: missing field {spec.messages} ({spec.key}.messages; '
                         f'the row has {", ".join(fields) or "none"})')
      messages = check_conversation(fields[spec.messages], f'{where}: field {spec.messages}')
      yield Row(line, fields, messages=tuple(messages))
    else:
      yield Row(line, fields, *render_pair(spec, fields, where))


def read_split(spec: SourceSpec, data_dir: str | None, split: str
               ) -> Iterator[tuple[int, str, str]]:
  """(line, prompt, response) for every row of a pair source's split, in file order."""
  if spec.messages:
    raise ValueError(f'{spec.name} is a conversation source ({spec.key}.messages='
                     f'{spec.messages!r}): its rows have no single prompt and response; '
                     'read_rows gives their messages')
  for row in read_rows(spec, data_dir, split):
    yield row.line, row.prompt, row.response
