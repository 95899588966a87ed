"""The declared file formats: CSV (quoted fields, a header or given columns), a TSV without a
header, a JSON array (rows numbered by the line where they start), text one example a line,
Parquet; each bad input named by file and line."""

import json

import pytest

from additive_jax.data import readers
from additive_jax.data.sources import read_rows, source_spec


def write(directory, name, content):
  path = directory / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  return str(path)


def rows(path, file_format, columns=()):
  return readers.read_rows(file_format, path, columns)


def test_csv_quoted_fields_hold_commas_quotes_and_newlines(tmp_path):
  path = write(tmp_path, 'a.csv', 'text,label\n"one, two",1\n"say ""hi""\nthen go",0\nplain,1\n')
  assert rows(path, 'csv') == [(2, {'text': 'one, two', 'label': '1'}),
                               (3, {'text': 'say "hi"\nthen go', 'label': '0'}),
                               (5, {'text': 'plain', 'label': '1'})]


def test_csv_and_tsv_without_a_header_take_the_declared_columns(tmp_path):
  assert rows(write(tmp_path, 'a.csv', '1,"a, b"\n2,c\n'), 'csv', ('label', 'text')) == [
      (1, {'label': '1', 'text': 'a, b'}), (2, {'label': '2', 'text': 'c'})]
  assert rows(write(tmp_path, 'a.tsv', '1\ta "b\n2\tc\n'), 'tsv', ('label', 'text')) == [
      (1, {'label': '1', 'text': 'a "b'}), (2, {'label': '2', 'text': 'c'})]


def test_a_json_array_numbers_each_row_by_its_first_line(tmp_path):
  path = write(tmp_path, 'a.json', '[\n  {"q": "a", "n": 1},\n  {"q":\n   "b", "n": 2.5}, {"q": "c", "n": 3}\n]\n')
  assert rows(path, 'json') == [(2, {'q': 'a', 'n': '1'}), (3, {'q': 'b', 'n': '2.5'}),
                                (4, {'q': 'c', 'n': '3'})]


def test_text_is_one_example_a_non_blank_line(tmp_path):
  path = write(tmp_path, 'a.txt', 'first line\n\n  second\nthird\n')
  assert rows(path, 'text') == [(1, {'text': 'first line'}), (3, {'text': '  second'}),
                                (4, {'text': 'third'})]


def test_parquet_rows(tmp_path):
  pyarrow = pytest.importorskip('pyarrow')
  import pyarrow.parquet  # noqa: F401, pylint: disable=import-outside-toplevel
  table = pyarrow.table({'question': ['1+1?', '2+2?'], 'answer': [2, 4]})
  pyarrow.parquet.write_table(table, tmp_path / 'qa.parquet')
  spec = source_spec({'name': 'qa', 'format': 'parquet', 'files': {'test': 'qa.parquet'},
                      'prompt': 'Q: {question}\nA:', 'response': ' {answer}'})
  assert [(row.line, row.prompt, row.response) for row in read_rows(spec, str(tmp_path), 'test')] == [
      (1, 'Q: 1+1?\nA:', ' 2'), (2, 'Q: 2+2?\nA:', ' 4')]
  write(tmp_path, 'bad.parquet', 'not parquet')
  with pytest.raises(ValueError, match=r'bad.parquet: not a Parquet file'):
    rows(str(tmp_path / 'bad.parquet'), 'parquet')


@pytest.mark.parametrize('name, content, file_format, columns, message', [
    ('a.csv', 'text,label\n"a",1\n"b"\n', 'csv', (), r'a.csv:3: 1 comma-separated fields, the '
     r'header has 2 \(text, label\)'),
    ('a.csv', 'text,label\n"a",1\n\n"b",0\n', 'csv', (), r'a.csv:3: blank line'),
    ('a.csv', '"a",1\n"b",0,x\n', 'csv', ('text', 'label'), r'a.csv:2: 3 comma-separated fields, '
     r'the declared columns are 2 \(text, label\)'),
    ('a.tsv', '1\tgood\n0\tbad\textra\n', 'tsv', ('label', 'text'),
     r'a.tsv:2: 3 tab-separated fields, the declared columns are 2'),
    ('a.json', '{"q": "a"}\n', 'json', (), r'a.json:1: malformed JSON: expected a JSON array'),
    ('a.json', '[\n {"q": "a"},\n "b"\n]\n', 'json', (), r'a.json:3:2: expected a JSON object, got str'),
    ('a.json', '[\n {"q": "a"},\n {"q": "b",}\n]\n', 'json', (), r'a.json:3: malformed JSON'),
    ('a.json', '[\n {"q": "a"}\n {"q": "b"}\n]\n', 'json', (),
     r"a.json:3: malformed JSON: ',' or '\]' after an array element"),
    ('a.json', '[\n {"q": "a"},\n]\n', 'json', (), r"a.json:3: malformed JSON: a value after ','"),
    ('a.json', '[{"q": "a"}]\n[]\n', 'json', (), r'a.json:1: malformed JSON: text after the array'),
    ('a.json', b'[\n {"q": "\xff"}\n]\n', 'json', (), r'a.json:2: not UTF-8'),
    ('a.txt', '\n \n', 'text', (), r'a.txt: empty file'),
])
def test_bad_input_names_the_file_and_line(tmp_path, name, content, file_format, columns,
                                           message):
  path = write(tmp_path, name, content)
  with pytest.raises(ValueError, match=message):
    rows(path, file_format, columns)


def test_a_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/none.jsonl: no such data file'):
    rows(str(tmp_path / 'none.jsonl'), 'jsonl')


def test_every_format_reads_the_same_rows(tmp_path):
  """One table, written in each format a declaration may name, reads as the same fields."""
  table = [{'text': 'a, "b"', 'label': '1'}, {'text': 'c', 'label': '0'}]
  files = {'jsonl': ''.join(json.dumps(row) + '\n' for row in table),
           'json': json.dumps(table, indent=1),
           'csv': 'text,label\n"a, ""b""",1\nc,0\n',
           'tsv': 'text\tlabel\na, "b"\t1\nc\t0\n'}
  for file_format, content in files.items():
    path = write(tmp_path, f'table.{file_format}', content)
    assert [row for _, row in rows(path, file_format)] == table, file_format
