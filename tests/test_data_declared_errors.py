"""A bad declaration is named by its config key before any file is read; bad rows of a
declared source by file and line."""

import json

import pytest

from additive_jax.data.config import data_config
from additive_jax.data.pipeline import make_eval_batches
from additive_jax.data.sources import read_rows, source_spec

QA = {'name': 'qa', 'format': 'jsonl', 'files': {'test': 'qa.jsonl'},
      'prompt': 'Q: {q}\nA:', 'response': ' {a}'}
NEWS = {'name': 'news', 'format': 'tsv', 'columns': ('label', 'text'),
        'files': {'test': 'news.tsv'}, 'prompt': '{text}\nTopic:', 'response': '{label}',
        'labels': {'label': {'1': ' world news', '2': ' sports news'}}}


@pytest.mark.parametrize('changes, message', [
    ({'held_out': {'split': 'dev', 'fraction': 1.5}, 'files': {'train': 'qa.jsonl'}},
     r'config.data.source.held_out.fraction=1.5 must be in \(0, 1\)'),
    ({'held_out': {'split': 'dev', 'fraction': 0.0}, 'files': {'train': 'qa.jsonl'}},
     r'config.data.source.held_out.fraction=0.0 must be in \(0, 1\)'),
    ({'held_out': {'split': 'dev', 'fraction': 1}, 'files': {'train': 'qa.jsonl'}},
     r'config.data.source.held_out.fraction=1 must be in \(0, 1\)'),
    ({'held_out': {'split': 'dev'}, 'files': {'train': 'qa.jsonl'}},
     r'config.data.source.held_out needs both split and fraction'),
    ({'held_out': {'split': 'dev', 'fraction': 0.1}},
     r'config.data.source.held_out cuts .dev. from the train file, but '
     r'config.data.source.files.train is not set'),
    ({'held_out': {'split': 'test', 'fraction': 0.1}, 'files': {'train': 'a', 'test': 'b'}},
     r"config.data.source.held_out.split='test' has a file of its own"),
    ({'format': 'xml'}, r"config.data.source.format is 'xml': one of jsonl, json, tsv, csv, text"),
    ({'format': None}, r"config.data.source.format is not set: .* \('qa' is not a built-in "
     r'source \(sst2, gsm8k, trec, tinyshakespeare\)'),
    ({'response': None}, r"config.data.source.response is not set"),
    ({'files': {}}, r'config.data.source.files names no file'),
    ({'columns': ('q', 'a')}, r"config.data.source.columns is set, but format 'jsonl' has no "
     r'columns'),
    ({'messages': 'turns'}, r'config.data.source.prompt is set beside '
     r"config.data.source.messages='turns'"),
    ({'name': 'My QA'}, r"config.data.source.name must be lower-case .* got 'My QA'"),
    ({'prompt': 'Q: {q\nA:'}, r"config.data.source.prompt: bad str.format template"),
    ({'prompt': 'Q: {}\nA:'}, r'config.data.source.prompt: template .* has a positional \{\}'),
    ({'prompt': 'Q: {% if q %}{{ q }}\nA:'}, r'config.data.source.prompt: Jinja2 syntax error'),
    ({'labels': {'a': {'4': 7}}}, r"config.data.source.labels\['a'\]\['4'\] must be a label word"),
    ({'template': 'chat'}, r"config.data.source has unknown keys \['template'\]"),
])
def test_a_bad_declaration_is_named_by_its_key(changes, message):
  declaration = {**QA, **changes}
  with pytest.raises(ValueError, match=message):
    source_spec(declaration)


def test_an_unknown_built_in_and_split_are_named():
  with pytest.raises(ValueError, match=r"unknown data source 'imdb' \(known: sst2, gsm8k, "
                                       r'trec, tinyshakespeare\)'):
    source_spec('imdb')
  with pytest.raises(ValueError, match=r"qa has no split 'dev' \(splits: test\)"):
    source_spec(QA).path('/data', 'dev')


def rows_of(tmp_path, declaration, name, content, split='test'):
  (tmp_path / name).write_text(content)
  return list(read_rows(source_spec(declaration), str(tmp_path), split))


@pytest.mark.parametrize('declaration, name, content, message', [
    (QA, 'qa.jsonl', '{"q": "1?", "a": "1"}\n{"q": "2?"}\n',
     r'qa.jsonl:2: missing field a \(the templates or labels read it; the row has q\)'),
    ({**QA, 'prompt': '{% if q %}Q: {{ q }}{% endif %}\nA:', 'response': ' {{ answer }}'},
     'qa.jsonl', '{"q": "1?", "answer": "1"}\n{"q": "2?", "a": "2"}\n',
     r'qa.jsonl:2: missing field answer'),
    (NEWS, 'news.tsv', '1\tPeace talks\n3\tA new chip\n',
     r"news.tsv:2: label '3' is not one of '1', '2' \(config.data.source.labels\)"),
    (QA, 'qa.jsonl', '{"q": "1?", "a": ["1"]}\n', r"qa.jsonl:1: field a is \['1'\], not text"),
    ({**QA, 'format': 'json', 'files': {'test': 'qa.json'}}, 'qa.json', '[]\n',
     r"qa.json: no rows in split 'test'"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, declaration, name, content, message):
  with pytest.raises(ValueError, match=message):
    rows_of(tmp_path, declaration, name, content)


def test_a_held_out_split_with_no_rows_is_refused(tmp_path):
  declaration = {**QA, 'files': {'train': 'qa.jsonl'},
                 'held_out': {'split': 'dev', 'fraction': 0.01}}
  content = ''.join(json.dumps({'q': f'{n}?', 'a': str(n)}) + '\n' for n in range(10))
  assert len(rows_of(tmp_path, declaration, 'qa.jsonl', content, 'train')) == 10
  with pytest.raises(ValueError, match=r"qa.jsonl: no rows in split 'dev'"):
    rows_of(tmp_path, declaration, 'qa.jsonl', content, 'dev')


def test_a_file_that_does_not_exist_is_named(smollm2_tokenizer, tmp_path):
  config = data_config()
  config.source.name, config.source.format = 'qa', 'jsonl'
  config.source.files.test, config.source.response = 'missing/qa.jsonl', ' {a}'
  config.data_dir, config.eval_split = str(tmp_path), 'test'
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/missing/qa.jsonl: no such data file '
                                              r"\(split 'test' of source 'qa'"):
    make_eval_batches(config, smollm2_tokenizer, batch_size=1, seq_len=16,
                      cache_dir=str(tmp_path / 'cache'))
  assert not (tmp_path / 'cache').exists()  # refused before any preparation
