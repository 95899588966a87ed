"""Readers and source specs: rows from JSONL, TSV and text, and a clear error, with file and
line, for each kind of bad input."""

import os

import pytest

from additive_jax.data import readers, sources
from conftest import SHARED_DATA

SST2, GSM8K, TINY_SHAKESPEARE = map(sources.source_spec, ('sst2', 'gsm8k', 'tinyshakespeare'))


def write(directory, relative, content):
  path = os.path.join(directory, relative)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content if isinstance(content, bytes) else content.encode())
  return path


def split_rows(spec, directory, split='test'):
  return list(sources.read_split(spec, str(directory), split))


def test_sst2_rows_strip_the_sentence_and_map_the_label(tmp_path):
  write(tmp_path, 'sst2/test.tsv', "sentence\tlabel\nit 's fine \t1\nbleak \t0\n")
  assert split_rows(SST2, tmp_path) == [
      (2, "Review: it 's fine\nSentiment:", ' positive'),
      (3, 'Review: bleak\nSentiment:', ' negative')]


def test_gsm8k_rows_keep_the_answer_lines(tmp_path):
  write(tmp_path, 'gsm8k/test.jsonl', '{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n')
  assert split_rows(GSM8K, tmp_path) == [(1, 'Question: 1+1?\nAnswer:', ' 1+1=2\n#### 2')]


def test_text_paragraphs_and_the_held_out_portion(tmp_path):
  lines = ['A:', 'one', '', 'B:', 'two', 'three', '', '', 'C:', 'four', 'D:']  # 11 lines
  path = write(tmp_path, 'text.txt', '\n'.join(lines) + '\n')
  assert list(readers.read_paragraphs(path)) == [
      (1, {'text': 'A:\none'}), (4, {'text': 'B:\ntwo\nthree'}), (9, {'text': 'C:\nfour\nD:'})]
  # 11 lines: the first 90% is round(9.9) = 10 lines, the rest is line 11 alone
  assert list(readers.read_paragraphs(path, (0.0, 0.9))) == [
      (1, {'text': 'A:\none'}), (4, {'text': 'B:\ntwo\nthree'}), (9, {'text': 'C:\nfour'})]
  assert list(readers.read_paragraphs(path, (0.9, 1.0))) == [(11, {'text': 'D:'})]


def test_tiny_shakespeare_splits_hold_out_the_last_tenth_of_the_lines():
  spec = TINY_SHAKESPEARE
  train = split_rows(spec, SHARED_DATA, 'train')
  test = split_rows(spec, SHARED_DATA, 'test')
  # input.txt has 40,000 lines; line 36,000 is in the middle of a speech
  last_line, _, last_text = train[-1]
  assert last_line + last_text.count('\n') == 36000
  assert last_text.endswith('She hung about my neck; and kiss on kiss')
  assert test[0][0] == 36001 and test[0][2].startswith('She vied so fast, protesting oath on oath,')
  assert test[2] == (36015, '', 'GREMIO:\nAmen, say we: we will be witnesses.')
  assert all(prompt == '' for _, prompt, _ in train + test)


@pytest.mark.parametrize('relative, content, spec, message', [
    ('gsm8k/test.jsonl', '{"question": "q", "answer": "a"}\n{"question": "q" "answer": "a"}\n',
     GSM8K, r'test.jsonl:2: malformed JSON'),
    ('gsm8k/test.jsonl', '{"question": "q", "answer": "a"}\n{"question": "q"}\n',
     GSM8K, r'test.jsonl:2: missing field answer'),
    ('gsm8k/test.jsonl', '{"question": "q", "answer": "a"}\n\n{"question": "q", "answer": "a"}\n',
     GSM8K, r'test.jsonl:2: blank line'),
    ('gsm8k/test.jsonl', '["q", "a"]\n', GSM8K, r'test.jsonl:1: expected a JSON object'),
    ('sst2/test.tsv', 'sentence\tlabel\ngood \t1\nodd \t2\n', SST2,
     r"test.tsv:3: label '2' is not one of '0', '1'"),
    ('sst2/test.tsv', 'sentence\nsome words \n', SST2, r'test.tsv:2: missing field label'),
    ('sst2/test.tsv', 'sentence\tlabel\ngood \t1\nno tab here\n', SST2,
     r'test.tsv:3: 1 tab-separated fields, the header has 2'),
    ('sst2/test.tsv', b'sentence\tlabel\ngood \t1\nbad \xff byte \t0\n', SST2,
     r'test.tsv:3: not UTF-8 \(byte 0xff at column 5\)'),
    ('sst2/test.tsv', '', SST2, r'test.tsv: empty file'),
    ('sst2/test.tsv', 'sentence\tlabel\n', SST2, r"test.tsv: no rows in split 'test'"),
    ('tinyshakespeare/input.txt', '\n\n', TINY_SHAKESPEARE, r'input.txt: empty file'),
])
def test_bad_input_names_the_file_and_line(tmp_path, relative, content, spec, message):
  write(tmp_path, relative, content)
  with pytest.raises(ValueError, match=message):
    split_rows(spec, tmp_path)


def test_unknown_source_and_split_are_named():
  with pytest.raises(ValueError, match=r"unknown data source 'imdb' \(known: sst2, gsm8k"):
    sources.source_spec('imdb')
  with pytest.raises(ValueError, match=r"gsm8k has no split 'dev' \(splits: train, test\)"):
    GSM8K.path('/data', 'dev')


@pytest.mark.parametrize('value', ['null', '["a", "b"]', '{"x": 1}', 'true'])
def test_a_field_that_is_not_text_is_named(tmp_path, value):
  directory = tmp_path / 'gsm8k'
  directory.mkdir()
  (directory / 'train.jsonl').write_text('{"question": "q", "answer": "a #### 1"}\n'
                                         f'{{"question": {value}, "answer": "a #### 2"}}\n')
  with pytest.raises(ValueError, match=r'train.jsonl:2: field question is .*, not text'):
    list(sources.read_split(sources.source_spec('gsm8k'), str(tmp_path), 'train'))
