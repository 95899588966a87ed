"""Fuzzed data: the readers of every format, the templates, a split's rows and a source's
declaration, on random and corrupted input.

The property: a result, or the documented error naming what was bad. The readers and a
split's rows raise a `ValueError` naming the file (and the line, data/readers.py and
data/sources.py); a template a `ValueError` naming its config key (data/render.py); a
declaration a `ValueError` naming `config.data.source` (data/declarations.py). Anything else
escaping (a KeyError, IndexError, UnicodeDecodeError, RecursionError, an OSError of pyarrow's)
is a bug.
"""

import csv
import io
import json
import os
import tempfile

from hypothesis import given
from hypothesis import strategies as st
import pytest

from additive_jax.data import readers, sources
from additive_jax.data.declarations import source_spec
from additive_jax.data.render import Template
from additive_jax.data.spec import SourceSpec, Split
from fuzz_helpers import JSON_VALUES, corrupted, fuzz, outcome, snapshot

FIELDS = st.one_of(st.sampled_from(['text', 'label', 'a', 'b', '']), st.text(max_size=4))
FIELD_TEXT = st.text(st.characters(codec='utf-8'), max_size=12)
# the inputs that sizes and nesting break: a field over csv's limit (131,072 bytes), an array
# nested past the recursion limit, an integer past Python's 4,300 digits
OVERSIZED = (b'x' * 140_000, b'[' * 3000, b'{"a":' * 3000, b'1' * 5000, b'-' * 5000 + b'1')


def _lines(rows: list[str]) -> bytes:
  return '\n'.join(rows).encode('utf-8', 'surrogatepass')


@st.composite
def table_text(draw, separator: str) -> bytes:
  """A header and rows of random fields, each row with about the header's field count."""
  width = draw(st.integers(1, 3))
  rows = [[draw(FIELDS) for _ in range(width)]]
  for _ in range(draw(st.integers(0, 4))):
    rows.append([draw(FIELD_TEXT) for _ in range(width + draw(st.sampled_from([0, 0, 0, -1, 1])))])
  if separator == ',':
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode('utf-8', 'surrogatepass')
  return _lines(['\t'.join(row) for row in rows])


JSON_OBJECTS = st.dictionaries(FIELDS, JSON_VALUES, max_size=3)
FORMAT_TEXT = {
    'jsonl': st.lists(st.one_of(JSON_OBJECTS.map(json.dumps), JSON_VALUES.map(json.dumps)),
                      max_size=4).map(_lines),
    'json': st.lists(JSON_OBJECTS.map(json.dumps), max_size=4).map(
        lambda objects: ('[' + ',\n'.join(objects) + ']').encode()),
    'tsv': table_text('\t'),
    'csv': table_text(','),
    'text': st.lists(FIELD_TEXT, max_size=5).map(_lines),
    'paragraphs': st.lists(FIELD_TEXT, max_size=5).map(_lines),
}


def parquet_bytes(rows: dict) -> bytes:
  import pyarrow
  import pyarrow.parquet
  out = io.BytesIO()
  pyarrow.parquet.write_table(pyarrow.table(rows), out)
  return out.getvalue()


GOOD_PARQUET = parquet_bytes({'text': ['hello', 'world', 'x' * 40], 'label': [1, 2, 3]})


@st.composite
def file_bytes(draw, file_format: str) -> bytes:
  """A file of `file_format` as written, corrupted, oversized, or random bytes."""
  if file_format == 'parquet':
    good = draw(st.sampled_from([GOOD_PARQUET,
                                 parquet_bytes({'a': [None, 1.5], 'b': ['', '\x00']})]))
  else:
    good = draw(FORMAT_TEXT[file_format])
  kind = draw(st.sampled_from(('good', 'corrupted', 'corrupted', 'corrupted', 'oversized',
                               'random')))
  if kind == 'good':
    return good
  if kind == 'oversized':
    at = draw(st.integers(0, len(good)))
    return good[:at] + draw(st.sampled_from(OVERSIZED)) + good[at:]
  if kind == 'random':
    return draw(st.binary(max_size=64))
  return draw(corrupted(good))


def write(directory: str, data: bytes) -> str:
  path = os.path.join(directory, 'data.file')
  with open(path, 'wb') as f:
    f.write(data)
  return path


@pytest.mark.parametrize('file_format', readers.FORMATS)
@fuzz(100)
@given(data=st.data())
def test_every_reader_gives_rows_or_names_the_file(file_format, data):
  content = data.draw(file_bytes(file_format), label='content')
  columns = ()
  if file_format in readers.COLUMN_FORMATS and data.draw(st.booleans(), label='headerless'):
    columns = tuple(data.draw(st.lists(FIELDS, min_size=1, max_size=3, unique=True),
                              label='columns'))
  start = data.draw(st.floats(0, 1), label='start')
  portion = (start, data.draw(st.floats(start, 1), label='stop'))
  with tempfile.TemporaryDirectory() as directory:
    path = write(directory, content)
    rows = outcome(lambda: readers.read_rows(file_format, path, columns, portion), (ValueError,),
                   path)
    assert os.listdir(directory) == ['data.file']
  if not isinstance(rows, ValueError):
    for line, row in rows:
      assert isinstance(line, int) and line >= 1
      assert isinstance(row, dict) and all(isinstance(key, str) for key in row)


# What a template is made of: both syntaxes' marks, every kind of str.format field (attribute,
# index, conversion, format spec, a nested field), Jinja2 expressions that fail on text
# (arithmetic, a call, a missing template), and stray brackets.
TEMPLATE_PIECES = (
    '{', '}', '{{', '}}', '{%', '%}', '{#', '#}', '{a}', '{b}', '{}', '{0}', '{a.x}', '{a[0]}',
    '{a[9]}', '{a[x]}', '{a!r}', '{a!z}', '{a:>4}', '{a:d}', '{a:{b}}', '{a:{c}}', '{ a }',
    '{{ a }}', '{{ b|upper }}', '{{ a / 0 }}', '{{ a - 1 }}', '{{ a|int / 0 }}', '{{ a() }}',
    '{{ a.x.y }}', '{{ a[99] }}', '{{ "%d" % a }}', '{{ a|foo }}', '{% if a %}', '{% else %}',
    '{% endif %}', '{% for x in a %}', '{% endfor %}', '{% extends "x" %}', '{% include a %}',
    '{% set a = 1 %}', '{% raw %}', '{% endraw %}', '{{ ' + '(' * 300 + 'a' + ')' * 300 + ' }}',
    '(', ')', '[', ']', '.', ':', '!', '|', '"', "'", '\n', '\x00', 'Review: ', ' ')
TEMPLATES = st.lists(st.one_of(st.sampled_from(TEMPLATE_PIECES), st.text(max_size=3)),
                     max_size=6).map(''.join)
KEY = 'config.data.source.prompt'


@fuzz(400)
@given(text=TEMPLATES, data=st.data())
def test_a_template_compiles_and_renders_or_names_its_key(text, data):
  template = outcome(lambda: Template(text, KEY), (ValueError,), KEY)
  if isinstance(template, ValueError):
    return
  assert all(isinstance(field, str) for field in template.fields)
  # a row holds every field a template reads (render_pair checks that first), values as text
  values = {field: data.draw(st.text(max_size=4), label=field) for field in template.fields}
  rendered = outcome(lambda: template.render(values), (ValueError,), KEY)
  assert isinstance(rendered, (str, ValueError))


@fuzz(150)
@given(content=FORMAT_TEXT['jsonl'].flatmap(lambda good: st.one_of(st.just(good), corrupted(good))),
       prompt=TEMPLATES, response=TEMPLATES,
       labels=st.one_of(st.just({}), st.dictionaries(FIELDS, st.dictionaries(
           st.text(max_size=2), st.sampled_from([' yes', ' no']), min_size=1, max_size=2),
           max_size=1)),
       messages=st.sampled_from(['', '', 'a', 'messages']))
def test_a_splits_rows_render_or_name_the_file_and_line(content, prompt, response, labels,
                                                        messages):
  declaration = {'name': 'fuzzed', 'format': 'jsonl', 'files': {'train': 'rows.jsonl'},
                 'prompt': None if messages else prompt, 'response': None if messages else response,
                 'labels': None if messages else labels, 'messages': messages or None}
  spec = outcome(lambda: source_spec(declaration), (ValueError,), 'config.data.source')
  if isinstance(spec, ValueError):
    return
  with tempfile.TemporaryDirectory() as directory:
    with open(os.path.join(directory, 'rows.jsonl'), 'wb') as f:
      f.write(content)
    path = spec.path(directory, 'train')
    rows = outcome(lambda: list(sources.read_rows(spec, directory, 'train')), (ValueError,), path)
  if not isinstance(rows, ValueError):
    for row in rows:
      assert isinstance(row.prompt, str) and isinstance(row.response, str)
      assert all(isinstance(m['content'], str) for m in row.messages)


# A declaration's keys with values of every type: the right kind, a near miss, or anything.
DECLARED_VALUES = {
    'name': st.sampled_from(['sst2', 'gsm8k', 'tinyshakespeare', 'mine', '', 'Bad', '1x']),
    'format': st.sampled_from(readers.FORMATS + ('xml', '')),
    'files': st.one_of(st.dictionaries(st.sampled_from(['train', 'dev', 'test', 'other', '']),
                                       st.one_of(st.none(), st.just('a/b.tsv'),
                                                 st.text(max_size=3)), max_size=3),
                       st.just('train.tsv'), st.lists(st.text(max_size=3), max_size=2)),
    'columns': st.one_of(st.text(max_size=3), st.lists(FIELDS, max_size=3).map(tuple),
                         st.lists(st.integers(), max_size=2)),
    'prompt': TEMPLATES, 'response': TEMPLATES,
    'labels': st.one_of(st.dictionaries(FIELDS, st.one_of(st.dictionaries(
        st.one_of(st.text(max_size=2), st.integers(0, 3)),
        st.one_of(st.text(max_size=3), st.none())), JSON_VALUES), max_size=2),
        st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2)),
    'messages': st.one_of(st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2)),
    'held_out': st.one_of(
        st.fixed_dictionaries({}, optional={
            'split': st.one_of(st.sampled_from(['dev', 'test', 'train', '']), JSON_VALUES),
            'fraction': st.one_of(st.floats(-1, 2), st.sampled_from([0, 1, 0.5, True]),
                                  JSON_VALUES)}),
        st.text(max_size=3), st.lists(st.integers(), max_size=2)),
}
# Valid declarations (a built-in, a pair source, a conversation source) for a few keys to change.
VALID_DECLARATIONS = (
    {'name': 'sst2'}, {'name': 'tinyshakespeare'},
    {'name': 'mine', 'format': 'tsv', 'files': {'train': 'a.tsv'}, 'response': '{x}'},
    {'name': 'chat', 'format': 'jsonl', 'files': {'train': 'a.jsonl'}, 'messages': 'messages'})


@st.composite
def declarations(draw) -> dict:
  """A valid declaration with one to three keys given another value of the right kind, a near
  miss, or anything; an unknown key now and then."""
  declaration = dict(draw(st.sampled_from(VALID_DECLARATIONS)))
  for key in draw(st.lists(st.sampled_from(sorted(DECLARED_VALUES) + ['bogus']), min_size=1,
                           max_size=3, unique=True)):
    declaration[key] = draw(st.one_of(DECLARED_VALUES.get(key, st.just(1)), st.none(), JSON_VALUES))
  return declaration


@fuzz(400)
@given(declaration=st.one_of(declarations(), JSON_VALUES, st.text(max_size=8)))
def test_a_declaration_resolves_or_names_its_key(declaration):
  spec = outcome(lambda: source_spec(declaration), (ValueError,))
  if isinstance(spec, ValueError):
    assert 'config.data.source' in str(spec) or 'unknown data source' in str(spec), spec
    return
  assert isinstance(spec, SourceSpec) and spec.format in readers.FORMATS
  assert all(isinstance(split, Split) for split in spec.splits.values())
  for split in spec.splits:
    assert isinstance(spec.path('/data', split), str)
  repr(spec)  # the prepared data's fingerprint


# Regressions: what the fuzzing found, one input each.

@pytest.mark.parametrize('file_format, content, message', [
    ('jsonl', b'{"a": ' + b'[' * 3000 + b'\n', r'data.file:1: unreadable JSON: nested too deeply'),
    ('json', b'[\n' + b'[' * 3000, r'data.file:2: unreadable JSON: nested too deeply'),
    ('jsonl', b'{"a": ' + b'1' * 5000 + b'}\n', r'data.file:1: unreadable JSON: Exceeds the limit'),
    ('json', b'[\n{"a": ' + b'1' * 5000 + b'}]',
     r'data.file:2: unreadable JSON: Exceeds the limit'),
    # a footer pyarrow cannot parse is an OSError, not an ArrowException
    ('parquet', b'PAR1' + b'\0' * 20 + b'PAR1', r"data.file: not a Parquet file: .*thrift"),
], ids=['jsonl_nested', 'json_nested', 'jsonl_long_int', 'json_long_int', 'parquet_footer'])
def test_json_that_json_cannot_hold_and_a_corrupt_parquet_name_the_file(tmp_path, file_format,
                                                                        content, message):
  path = write(str(tmp_path), content)
  with pytest.raises(ValueError, match=message):
    readers.read_rows(file_format, path)


@pytest.mark.parametrize('text, message', [
    ('{a[9]}', 'IndexError: string index out of range'),
    ('{a.x}', "AttributeError: 'str' object has no attribute 'x'"),
    ('{a[x]}', 'TypeError: string indices must be integers'),
    ('{{ a / 2 }}', r'TypeError: unsupported operand type\(s\) for /'),
    ('{{ a|int / 0 }}', 'ZeroDivisionError: division by zero'),
    ('{% extends "x" %}', 'TypeError: no loader for this environment specified'),
], ids=['index', 'attribute', 'string_index', 'arithmetic', 'division', 'extends'])
def test_a_template_that_fails_on_a_row_names_its_key(text, message):
  with pytest.raises(ValueError, match=f'^{KEY}: template .* fails on this row: {message}'):
    Template(text, KEY).render({'a': 'ab'})


@pytest.mark.parametrize('text, message', [
    ('{a!z}', r"converts \{a\} with !z; str.format knows !r, !s and !a"),
    ('{{ ' + '(' * 300 + 'a' + ')' * 300 + ' }}', 'the template nests too deeply for Jinja2'),
], ids=['conversion', 'nesting'])
def test_a_template_that_cannot_compile_names_its_key(text, message):
  with pytest.raises(ValueError, match=f'^{KEY}: .*{message}'):
    Template(text, KEY)


def test_a_field_nested_in_a_format_spec_is_read_from_the_row(tmp_path):
  spec = source_spec({'name': 'nested', 'format': 'jsonl', 'files': {'train': 'rows.jsonl'},
                      'response': '{a:>{width}}'})
  assert spec.fields() == {'a', 'width'}
  (tmp_path / 'rows.jsonl').write_text('{"a": "x", "width": 3}\n{"a": "x"}\n')
  rows = sources.read_rows(spec, str(tmp_path), 'train')
  assert next(rows).response == '  x'
  with pytest.raises(ValueError, match=r'rows.jsonl:2: missing field width'):
    next(rows)


@pytest.mark.parametrize('changes, message', [
    ({'files': 'train.tsv'},
     r"files must be a mapping, e\.g\. \{'train': 'news/train\.tsv'\}, got"),
    ({'labels': ['0', '1']}, r"labels must be a mapping, e\.g\. \{'label': \{'1': ' World'\}\}"),
    ({'held_out': 0.1},
     r"held_out must be a mapping, e\.g\. \{'split': 'dev', 'fraction': 0\.05\}"),
    ({'columns': 3}, r'columns must be distinct column names, got 3'),
    ({'held_out': {'split': ['dev'], 'fraction': 0.1}}, r"held_out\.split must name a split"),
    ({'files': {1: 'a.tsv'}}, r'files has a split named 1'),
], ids=['files', 'labels', 'held_out', 'columns', 'held_out_split', 'split_name'])
def test_a_declaration_of_the_wrong_shape_is_named_by_its_key(changes, message):
  declaration = {'name': 'mine', 'format': 'tsv', 'files': {'train': 'a.tsv'}, 'response': '{x}',
                 **changes}
  with pytest.raises(ValueError, match=f'config.data.source.{message}'):
    source_spec(declaration)
