"""Readers of the file formats a source may declare.

    for line, row in read_rows('tsv', path, columns=('label', 'text'), portion=(0.0, 0.9)): ...

| format | a row is | fields |
|---|---|---|
| `jsonl` | one JSON object per line | the object's keys |
| `json` | one object of a JSON array (the whole file) | the object's keys |
| `tsv` | a line, split at tabs; no quoting (SST-2 has bare quotes) | the header line's names, or `columns` |
| `csv` | a record of comma-separated values, quoting as Python's `csv` | the header record's names, or `columns` |
| `text` | a non-blank line (blank lines are skipped) | `text` |
| `paragraphs` | a run of non-blank lines, joined by newlines | `text` |
| `parquet` | a row of the table (pyarrow reads it) | the table's columns |

Each reader yields `(line, row)`: the 1-based number of the line where the row
starts (for Parquet, the row's number) and a dict; numbers become text, other
values (a list of chat messages, ...) stay as they are. A JSON array's rows may
share a line (`json.dump` writes the whole array on one), so their `line` is a
`Line` that also holds the column where the object starts and prints as
`line:column`: `f'{path}:{line}'` names each row exactly, in every layout.

Files are read through `etils.epath`, so a `gs://` path works. Bad input fails
with a `ValueError` that names the file and the line: a missing or empty file,
bytes that are not UTF-8, malformed JSON (or JSON nested too deeply, or with an
integer of more than 4,300 digits, which Python's `json` cannot read), a value
that is not a JSON object, a row whose field count differs from the header's, a
blank line in JSONL, JSON, TSV or CSV, a Parquet file that pyarrow cannot read.

`portion=(start, stop)` keeps that fraction of the file's rows, for a split held
out of a file; for `paragraphs` it is a fraction of the lines (a paragraph may
be cut in two), how Tiny Shakespeare holds out its last 10% of lines.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from typing import Iterator, Sequence

from etils import epath

Rows = Iterator[tuple[int, dict]]
COLUMN_FORMATS = ('tsv', 'csv')  # the formats a declaration may give column names


class Line(int):
  """A row's 1-based line number and, for a JSON array's row, the 1-based column where its
  object starts (0: the format has one row start a line at most). It is the number everywhere
  a number is used; printed, it is `line:column` where there is a column."""
  column: int

  def __new__(cls, line: int, column: int = 0):
    number = super().__new__(cls, line)
    number.column = column
    return number

  def __str__(self):
    return f'{int(self)}:{self.column}' if self.column else str(int(self))

  def __format__(self, spec: str) -> str:  # int's would drop the column from f'{line}'
    return format(str(self), spec)


def read_bytes(path: str) -> bytes:
  file = epath.Path(path)
  if not file.exists():
    raise FileNotFoundError(f'{path}: no such data file')
  return file.read_bytes()


def numbered_lines(path: str) -> list[tuple[int, str]]:
  """The file's lines without line ends, numbered from 1.

  Decoded line by line, not as a whole, so that a byte which is not UTF-8 is
  reported with its line.
  """
  data = read_bytes(path)
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


def _portion(items: list, portion: tuple[float, float]) -> list:
  start, stop = (round(fraction * len(items)) for fraction in portion)
  return items[start:stop]


def _not_blank(path: str, number: int, text: str) -> None:
  if not text.strip():
    raise ValueError(f'{path}:{number}: blank line')


def _number_as_text(value):
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  return str(value) if is_number else value


def _unreadable(path: str, number: int, err: Exception) -> ValueError:
  """Well-formed JSON that `json` refuses: nested past the recursion limit, or an integer past
  Python's 4,300 digits (a plain ValueError, not a JSONDecodeError)."""
  what = 'nested too deeply' if isinstance(err, RecursionError) else str(err)
  return ValueError(f'{path}:{number}: unreadable JSON: {what}')


def _object(path: str, number: int, value) -> dict:
  if not isinstance(value, dict):
    raise ValueError(f'{path}:{number}: expected a JSON object, got {type(value).__name__}')
  return {key: _number_as_text(item) for key, item in value.items()}


def read_jsonl(path: str, columns: Sequence[str] = ()) -> Rows:
  """One JSON object per line."""
  del columns  # the objects name their fields
  for number, text in numbered_lines(path):
    _not_blank(path, number, text)
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{number}: malformed JSON: {e.msg} (column {e.colno})') from None
    except (ValueError, RecursionError) as e:
      raise _unreadable(path, number, e) from None
    yield number, _object(path, number, value)


def read_json(path: str, columns: Sequence[str] = ()) -> Rows:
  """A JSON array of objects; each row is placed by the line and column where its object starts
  (its Line), as several objects may start on one line."""
  del columns
  text = '\n'.join(line for _, line in numbered_lines(path))  # UTF-8 checked line by line
  decoder = json.JSONDecoder()
  position, line, counted = 0, 1, 0  # line is the number of the line at `counted`

  def line_at(at: int) -> int:
    nonlocal line, counted
    line, counted = line + text.count('\n', counted, at), at
    return line

  def skip_space(at: int) -> int:
    while at < len(text) and text[at] in ' \t\r\n':
      at += 1
    return at

  def expect(found: bool, message: str, at: int) -> None:
    if not found:
      raise ValueError(f'{path}:{line_at(at)}: malformed JSON: {message}')

  position = skip_space(0)
  expect(text[position] == '[', 'expected a JSON array of objects', position)
  position = skip_space(position + 1)
  while text[position:position + 1] != ']':
    try:
      value, end = decoder.raw_decode(text, position)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})') from None
    except (ValueError, RecursionError) as e:
      raise _unreadable(path, line_at(position), e) from None
    number = Line(line_at(position), position - text.rfind('\n', 0, position))
    yield number, _object(path, number, value)
    position = skip_space(end)
    if text[position:position + 1] == ',':
      position = skip_space(position + 1)
      expect(text[position:position + 1] not in (']', ''), "a value after ','", position)
    else:
      expect(text[position:position + 1] == ']', "',' or ']' after an array element", position)
  expect(skip_space(position + 1) == len(text), 'text after the array', position + 1)


def _table(path: str, records: list[tuple[int, list[str]]], columns: Sequence[str],
           separator: str) -> Rows:
  """Rows of (line, fields) records named by `columns`, else by the first record (a header)."""
  if columns:
    header, described = list(columns), f'the declared columns are {len(columns)}'
  else:
    (_, header), *records = records
    described = f'the header has {len(header)}'
  for number, fields in records:
    if len(fields) != len(header):
      raise ValueError(f'{path}:{number}: {len(fields)} {separator}-separated fields, '
                       f'{described} ({", ".join(header)})')
    yield number, dict(zip(header, fields))


def read_tsv(path: str, columns: Sequence[str] = ()) -> Rows:
  """Tab-separated fields, named by the first line or by `columns`; no quoting."""
  records = []
  for number, text in numbered_lines(path):
    if records or columns:  # a header line may be anything
      _not_blank(path, number, text)
    records.append((number, text.split('\t')))
  return _table(path, records, columns, 'tab')


def read_csv(path: str, columns: Sequence[str] = ()) -> Rows:
  """Comma-separated values (quoted fields may hold commas, quotes and newlines)."""
  lines = numbered_lines(path)
  reader = csv.reader(text + '\n' for _, text in lines)
  records, ended = [], 0
  try:
    for fields in reader:
      start, ended = ended + 1, reader.line_num
      if not fields:
        raise ValueError(f'{path}:{start}: blank line')
      records.append((start, fields))
  except csv.Error as e:
    raise ValueError(f'{path}:{reader.line_num}: malformed CSV: {e}') from None
  return _table(path, records, columns, 'comma')


def read_text(path: str, columns: Sequence[str] = ()) -> Rows:
  """Each non-blank line a row `{'text': ...}`."""
  del columns
  for number, text in numbered_lines(path):
    if text.strip():
      yield number, {'text': text}


def read_paragraphs(path: str, portion: tuple[float, float] = (0.0, 1.0)) -> Rows:
  """Paragraphs (runs of non-blank lines) of the `portion` of the lines, as rows `{'text': ...}`
  with the lines joined by newlines."""
  lines = _portion(numbered_lines(path), portion)
  for is_text, paragraph in itertools.groupby(lines, key=lambda line: bool(line[1].strip())):
    if is_text:
      paragraph = list(paragraph)
      yield paragraph[0][0], {'text': '\n'.join(text for _, text in paragraph)}


def read_parquet(path: str, columns: Sequence[str] = ()) -> Rows:
  """The table's rows, numbered from 1."""
  del columns
  import pyarrow  # only a Parquet source needs it, and the package does not require it
  import pyarrow.parquet
  data = read_bytes(path)
  try:  # a corrupt page is an OSError that is no ArrowException ("Corrupt snappy compressed data")
    rows = pyarrow.parquet.read_table(io.BytesIO(data)).to_pylist()
  except (pyarrow.ArrowException, OSError) as e:
    raise ValueError(f'{path}: not a Parquet file: {" ".join(str(e).split())}') from None
  for number, row in enumerate(rows, 1):
    yield number, {key: _number_as_text(value) for key, value in row.items()}


# The formats whose rows a reader yields from the whole file; `paragraphs` is cut by lines.
READERS = {'jsonl': read_jsonl, 'json': read_json, 'tsv': read_tsv, 'csv': read_csv,
           'text': read_text, 'parquet': read_parquet}
FORMATS = ('jsonl', 'json', 'tsv', 'csv', 'text', 'paragraphs', 'parquet')


def read_rows(file_format: str, path: str, columns: Sequence[str] = (),
              portion: tuple[float, float] = (0.0, 1.0)) -> list[tuple[int, dict]]:
  """The `portion` of the file's rows, read as `file_format` (one of FORMATS)."""
  if file_format == 'paragraphs':
    return list(read_paragraphs(path, portion))
  return _portion(list(READERS[file_format](path, columns)), portion)
