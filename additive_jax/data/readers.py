"""Readers for the local file formats: JSONL, TSV with a header, plain text.

Each reader yields `(line, row)`: the 1-based number of the line where the row
starts, and a dict of strings. Bad input fails with a `ValueError` that names
the file and the line: an empty file, bytes that are not UTF-8, malformed JSON,
a line that is not a JSON object, a TSV row whose field count differs from the
header's. Nothing is skipped: a blank line in JSONL or TSV is an error too.

`portion=(start, stop)` keeps that fraction of the file's data lines (after the
TSV header), before they are parsed; it is how Tiny Shakespeare, which has no
split, holds out its last 10% of lines.
"""

from __future__ import annotations

import itertools
import json
from typing import Iterator

Rows = Iterator[tuple[int, dict[str, str]]]


def numbered_lines(path: str) -> list[tuple[int, str]]:
  """The file's lines without line ends, numbered from 1.

  Decoded line by line, not as a whole, so that a byte which is not UTF-8 is
  reported with its line.
  """
  with open(path, 'rb') as f:
    data = f.read()
  if not data.strip():
    raise ValueError(f'{path}: empty file')
  lines = []
  for number, raw in enumerate(data.splitlines(), 1):
    try:
      lines.append((number, raw.decode('utf-8')))
    except UnicodeDecodeError as e:
      raise ValueError(f'{path}:{number}: not UTF-8 (byte {raw[e.start]:#04x} at column '
                       f'{e.start + 1})') from None
  return lines


def _portion(lines: list, portion: tuple[float, float]) -> list:
  start, stop = (round(fraction * len(lines)) for fraction in portion)
  return lines[start:stop]


def _not_blank(path: str, number: int, text: str) -> None:
  if not text.strip():
    raise ValueError(f'{path}:{number}: blank line')


def read_jsonl(path: str, portion: tuple[float, float] = (0.0, 1.0)) -> Rows:
  """One JSON object per line; numbers become strings, other non-text values stay as they are
  (the source spec refuses one in a field it reads)."""
  for number, text in _portion(numbered_lines(path), portion):
    _not_blank(path, number, text)
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{number}: malformed JSON: {e.msg} (column {e.colno})') from None
    if not isinstance(row, dict):
      raise ValueError(f'{path}:{number}: expected a JSON object, got {type(row).__name__}')
    yield number, {key: _number_as_text(value) for key, value in row.items()}


def _number_as_text(value):
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  return str(value) if is_number else value


def read_tsv(path: str, portion: tuple[float, float] = (0.0, 1.0)) -> Rows:
  """Tab-separated fields named by the first line; no quoting (SST-2 has bare quotes)."""
  (_, header_text), *lines = numbered_lines(path)
  header = header_text.split('\t')
  for number, text in _portion(lines, portion):
    _not_blank(path, number, text)
    fields = text.split('\t')
    if len(fields) != len(header):
      raise ValueError(f'{path}:{number}: {len(fields)} tab-separated fields, the header '
                       f'has {len(header)} ({", ".join(header)})')
    yield number, dict(zip(header, fields))


def read_text(path: str, portion: tuple[float, float] = (0.0, 1.0)) -> Rows:
  """Paragraphs (runs of non-blank lines) as rows `{'text': ...}`, lines joined by newlines."""
  lines = _portion(numbered_lines(path), portion)
  for is_text, paragraph in itertools.groupby(lines, key=lambda line: bool(line[1].strip())):
    if is_text:
      paragraph = list(paragraph)
      yield paragraph[0][0], {'text': '\n'.join(text for _, text in paragraph)}


READERS = {'jsonl': read_jsonl, 'tsv': read_tsv, 'text': read_text}
