"""Any valid file trains: the same rows written in every layout of the declared formats (a JSON
array on one line, as `json.dump` writes it, or indented; JSONL; CSV with quoted newlines; TSV;
LF or CRLF line ends; Parquet) prepare the same examples, each row keyed by its index in the
split, and an error still names the row's line (and a JSON array row's column). The trainer,
from the command line, on a one-line JSON array."""

import csv
import io
import json
import os
import subprocess
import sys
import tempfile

from hypothesis import example, given
from hypothesis import strategies as st
import pytest

from additive_jax.data import readers, sources, tfds_builders
from cli_helpers import ROOT
from conftest import xla_flags
from fuzz_helpers import fuzz

# Text a row may hold in every layout: any character UTF-8 can write, newlines included; no
# other control characters (a CR would become part of a CRLF line end).
TEXT = st.text(st.one_of(st.characters(codec='utf-8', exclude_categories=('Cc',)),
                         st.just('\n')), max_size=8)
ROWS = st.lists(st.fixed_dictionaries({'q': TEXT, 'a': TEXT}), min_size=1, max_size=5)


def layouts(rows):
  """{file name: (format, bytes)}: `rows` in each layout that can hold them."""
  def crlf(data):
    return data.replace(b'\n', b'\r\n')

  def csv_bytes(line_end):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=line_end)
    writer.writerows([('q', 'a'), *((row['q'], row['a']) for row in rows)])
    return out.getvalue().encode()

  one_line = json.dumps(rows).encode()
  jsonl = ''.join(json.dumps(row) + '\n' for row in rows).encode()
  files = {'one_line.json': ('json', one_line),
           'one_line_no_end.json': ('json', one_line.rstrip()),
           'indented.json': ('json', json.dumps(rows, indent=2, ensure_ascii=False).encode()),
           'indented_crlf.json': ('json', crlf(json.dumps(rows, indent=1).encode())),
           'rows.jsonl': ('jsonl', jsonl), 'rows_crlf.jsonl': ('jsonl', crlf(jsonl)),
           'quoted.csv': ('csv', csv_bytes('\n')), 'quoted_crlf.csv': ('csv', csv_bytes('\r\n'))}
  # TSV has no quoting, and a line of tabs and spaces is blank
  if all((row['q'] + row['a']).strip() and not set('\t\n') & set(row['q'] + row['a'])
         for row in rows):
    tsv = ''.join(f'{q}\t{a}\n' for q, a in [('q', 'a'), *((r['q'], r['a']) for r in rows)])
    files.update({'rows.tsv': ('tsv', tsv.encode()), 'rows_crlf.tsv': ('tsv', crlf(tsv.encode()))})
  return files


def declaration(name, file_format, file):
  return {'name': name, 'format': file_format, 'files': {'train': file},
          'prompt': 'Q: {q}\nA:', 'response': ' {a}'}


def prepared(directory, name, file_format, file):
  """The split's prepared records, in order."""
  source = tfds_builders.data_source(declaration(name, file_format, file), 'train', directory,
                                     os.path.join(directory, 'cache'))
  return source.__getitems__(range(len(source)))


@fuzz(10)
@given(rows=ROWS)
@example(rows=[{'q': 'say "hi",\nthen go', 'a': ''}, {'q': 'é ü 日本', 'a': '[{"q": 1}]'}])
def test_every_layout_of_the_same_rows_prepares_the_same_examples(rows):
  expected = [(f'Q: {row["q"].strip()}\nA:'.encode(), f' {row["a"].strip()}'.encode())
              for row in rows]
  with tempfile.TemporaryDirectory() as directory:
    files = layouts(rows)
    try:
      import pyarrow.parquet  # pylint: disable=import-outside-toplevel
      pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows),
                                  os.path.join(directory, 'rows.parquet'))
      files['rows.parquet'] = ('parquet', None)
    except ImportError:  # Parquet needs pyarrow, which the package does not require
      pass
    for file, (file_format, data) in files.items():
      if data is not None:
        with open(os.path.join(directory, file), 'wb') as f:
          f.write(data)
    for index, (file, (file_format, _)) in enumerate(files.items()):
      records = prepared(directory, f'rows_{index}', file_format, file)
      assert [(record['prompt'], record['response']) for record in records] == expected, file


def test_a_one_line_array_names_each_row_by_line_and_column(tmp_path):
  (tmp_path / 'a.json').write_text(json.dumps([{'q': 'x', 'a': '1'}, {'q': 'y'}]))
  assert [str(line) for line, _ in readers.read_rows('json', str(tmp_path / 'a.json'))] == [
      '1:2', '1:24']
  (tmp_path / 'b.json').write_text(json.dumps([{'q': 'x', 'a': '1'}, {'q': 'y', 'a': '2'}]))
  assert [(record['line'], record['column'])  # what an over-long example's error names
          for record in prepared(str(tmp_path), 'rows', 'json', 'b.json')] == [(1, 2), (1, 24)]
  spec = sources.source_spec(declaration('rows', 'json', 'a.json'))
  with pytest.raises(ValueError, match=r'a\.json:1:24: missing field a '):
    list(sources.read_rows(spec, str(tmp_path), 'train'))


def test_a_lone_surrogate_is_named_before_tfds_writes(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"q": "x", "a": "1"}\n{"q": "\\ud800", "a": "2"}\n')
  with pytest.raises(ValueError, match=r"a\.jsonl:2: prompt holds '\\ud800' at character 4, "
                                       r'half of a UTF-16 surrogate pair'):
    prepared(str(tmp_path), 'rows', 'jsonl', 'a.jsonl')


def test_main_trains_on_a_json_array_written_on_one_line(tmp_path, tiny_with_tokenizer):
  rows = [{'question': f'{n}+{n}?', 'answer': f'#### {2 * n}'} for n in range(8)]
  (tmp_path / 'qa.json').write_text(json.dumps(rows))  # json.dump's layout: one line
  result = subprocess.run(
      [sys.executable, '-m', 'additive_jax.main', '--config=configs/gsm8k.py:prefix,runlocal',
       f'--workdir={tmp_path / "run"}', f'--config.model={tiny_with_tokenizer}',
       f'--config.data.data_dir={tmp_path}', '--config.data.source.format=json',
       '--config.data.source.files.train=qa.json', '--config.data.source.files.test=qa.json',
       '--config.seq_len=64', '--config.num_steps=1', '--config.eval_every=1',
       '--config.checkpoint_every=1', '--config.test_metric=', '--config.eval_metric='],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'XLA_FLAGS': xla_flags(1)})
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert summary['final_loss'] > 0 and summary['eval_loss'] > 0
  assert 'gsm8k train: 8 examples: 8 kept' in result.stdout


def test_a_tfds_error_that_needs_tensorflow_is_one_line(tmp_path, monkeypatch):
  """The generator's checks leave TFDS nothing to refuse; were a key ever repeated, TFDS's
  report of it (which imports TensorFlow) still ends as one line naming the files."""
  (tmp_path / 'a.jsonl').write_text('{"q": "x", "a": "1"}\n{"q": "y", "a": "2"}\n')
  generate = tfds_builders.DeclaredSource._generate_examples
  monkeypatch.setattr(tfds_builders.DeclaredSource, '_generate_examples',
                      lambda self, split: ((0, record) for _, record in generate(self, split)))
  with pytest.raises(ValueError, match=r"^rows: TFDS failed to write the prepared rows of "
                                       r".*a\.jsonl \(.*tensorflow'\)$"):
    prepared(str(tmp_path), 'rows', 'jsonl', 'a.jsonl')
