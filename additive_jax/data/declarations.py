"""A source declaration (`config.data.source`) → a checked `SourceSpec`.

    spec = source_spec(config.data.source)   # a ConfigDict, a plain dict, or a built-in's name

A built-in named by `name` (data/builtins.py) fills every key left unset: None,
an empty `labels`, a split of `files` left out. Every mistake is named by its
config key: an unknown format, a missing template, columns for a format that has
no columns, templates beside `messages`, a held-out fraction outside (0, 1), ...
What needs the files (a missing file, a row's fields) is checked when they are
read, and named by file and line.
"""

from __future__ import annotations

import re
from typing import Mapping

from additive_jax.data.builtins import BUILTIN_SOURCES
from additive_jax.data.config import SPLIT_KEYS
from additive_jax.data.readers import COLUMN_FORMATS, FORMATS
from additive_jax.data.spec import SourceSpec, Split

KEY = 'config.data.source'
_KEYS = ('name', 'format', 'files', 'columns', 'prompt', 'response', 'labels', 'messages',
         'held_out')
_NAME = re.compile(r'[a-z][a-z0-9_]*')
_TABLES = {'files': "{'train': 'news/train.tsv'}", 'held_out': "{'split': 'dev', 'fraction': 0.05}",
           'labels': "{'label': {'1': ' World'}}"}


def source_spec(declaration, key: str = KEY) -> SourceSpec:
  """The spec of a declaration (ConfigDict or dict), of a built-in's name, or a spec itself;
  `key` is the declaration's config key, which its errors name (a mixture entry's is
  `config.data.mixture.<entry>`)."""
  if isinstance(declaration, SourceSpec):
    return declaration
  if isinstance(declaration, str):
    if declaration not in BUILTIN_SOURCES:
      raise ValueError(f'unknown data source {declaration!r} (known: '
                       f'{", ".join(BUILTIN_SOURCES)})')
    declaration = {'name': declaration}
  declared = _plain(declaration)
  if not isinstance(declared, dict):
    raise ValueError(f'{key} must be a declaration (a ConfigDict), got {declaration!r}')
  unknown = sorted(set(declared) - set(_KEYS))
  if unknown:
    raise ValueError(f'{key} has unknown keys {unknown}; known: {", ".join(_KEYS)}')
  for table, example in _TABLES.items():  # merged key by key, so each must be a table
    if declared.get(table) is not None and not isinstance(declared[table], Mapping):
      raise ValueError(f'{key}.{table} must be a mapping, e.g. {example}, got '
                       f'{declared[table]!r}')
  name = declared.get('name')
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f'{key}.name must be lower-case letters, digits and underscores, starting '
                     f'with a letter (it names the prepared data), got {name!r}')
  merged = _merge(BUILTIN_SOURCES.get(name, {}), declared)
  return _spec(name, merged, key)


def _plain(value):
  """Nested ConfigDicts (and FieldReferences) as plain dicts and values."""
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  if isinstance(value, Mapping):
    return {key: _plain(item) for key, item in value.items()}
  return value


def _merge(builtin: dict, declared: dict) -> dict:
  """The declared keys over the built-in's; `files` and `held_out` key by key."""
  merged = dict(builtin)
  for key, value in declared.items():
    if key in ('files', 'held_out'):
      merged[key] = {**builtin.get(key, {}),
                     **{k: v for k, v in (value or {}).items() if v is not None}}
    elif value is not None and not (key == 'labels' and not value):
      merged[key] = value
  return merged


def _not_built_in(name: str) -> str:
  if name in BUILTIN_SOURCES:
    return ''
  return (f' ({name!r} is not a built-in source ({", ".join(BUILTIN_SOURCES)}), so its '
          'declaration says everything)')


def _spec(name: str, d: dict, key: str) -> SourceSpec:
  if d.get('format') not in FORMATS:
    got = 'is not set' if d.get('format') is None else f'is {d["format"]!r}'
    raise ValueError(f'{key}.format {got}: one of {", ".join(FORMATS)}{_not_built_in(name)}')
  columns = _columns(d, key)
  messages = d.get('messages') or ''
  if not isinstance(messages, str):
    raise ValueError(f'{key}.messages must name a field, got {messages!r}')
  if messages:
    for field in ('prompt', 'response', 'labels'):
      if d.get(field):
        raise ValueError(f'{key}.{field} is set beside {key}.messages={messages!r}: a '
                         "conversation is rendered by the tokenizer's chat template, not by "
                         'templates; leave prompt, response and labels unset')
  elif d.get('response') is None:
    raise ValueError(f'{key}.response is not set: a template over the row\'s fields, e.g. '
                     f"' {{answer}}' (or {key}.messages for chat data){_not_built_in(name)}")
  for field in ('prompt', 'response'):
    if not isinstance(d.get(field) or '', str):
      raise ValueError(f'{key}.{field} must be a template string, got {d[field]!r}')
  spec = SourceSpec(name=name, format=d['format'], splits=_splits(name, d, key),
                    prompt=d.get('prompt') or '', response=d.get('response') or '',
                    labels=_labels(d.get('labels') or {}, key), columns=columns, messages=messages,
                    key=key)
  spec.templates  # a template that does not compile fails here, named by its key
  return spec


def _columns(d: dict, key: str) -> tuple[str, ...]:
  columns = d.get('columns')
  if columns is None:
    return ()
  if d['format'] not in COLUMN_FORMATS:
    raise ValueError(f'{key}.columns is set, but format {d["format"]!r} has no columns (only '
                     f'{", ".join(COLUMN_FORMATS)} do)')
  if isinstance(columns, str):
    columns = (columns,)
  if (not isinstance(columns, (list, tuple)) or not columns
      or not all(isinstance(c, str) and c for c in columns)
      or len(set(columns)) != len(columns)):
    raise ValueError(f'{key}.columns must be distinct column names, got {columns!r}')
  return tuple(columns)


def _labels(labels: dict, key: str) -> dict[str, dict[str, str]]:
  """{field: {value: word}}; values given as numbers (`{1: ' World'}` on a command line) become
  text, as the readers make every number text."""
  mapped = {}
  for field, words in labels.items():
    if not isinstance(words, Mapping) or not words:
      raise ValueError(f'{key}.labels[{field!r}] must map each value of the field to its '
                       f"label word, e.g. {{'1': ' World'}}, got {words!r}")
    for value, word in words.items():
      if not isinstance(word, str) or not word.strip():
        raise ValueError(f'{key}.labels[{field!r}][{value!r}] must be a label word (text), '
                         f'got {word!r}')
    mapped[str(field)] = {str(value): word for value, word in words.items()}
  return mapped


def _splits(name: str, d: dict, key: str) -> dict[str, Split]:
  files = {split: file for split, file in (d.get('files') or {}).items() if file is not None}
  for split, file in files.items():
    if not isinstance(split, str) or not split:
      raise ValueError(f'{key}.files has a split named {split!r}; name each split, e.g. train')
    if not isinstance(file, str) or not file:
      raise ValueError(f'{key}.files.{split} must be a file path, got {file!r}')
  if not files:
    raise ValueError(f'{key}.files names no file: set {key}.files.train (and dev, test), '
                     f'relative to the data folder{_not_built_in(name)}')
  splits = {split: Split(file) for split, file in files.items()}
  held_out = d.get('held_out') or {}
  split, fraction = held_out.get('split'), held_out.get('fraction')
  if split is None and fraction is None:
    return _in_order(splits)
  if split is None or fraction is None:
    raise ValueError(f'{key}.held_out needs both split and fraction, got split={split!r}, '
                     f'fraction={fraction!r}')
  if not isinstance(split, str) or not split:
    raise ValueError(f'{key}.held_out.split must name a split, e.g. dev, got {split!r}')
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise ValueError(f'{key}.held_out.fraction={fraction!r} must be in (0, 1): the share of '
                     'the train file held out')
  if 'train' not in splits:
    raise ValueError(f'{key}.held_out cuts {split!r} from the train file, but {key}.files.train '
                     'is not set')
  if split in splits:
    raise ValueError(f'{key}.held_out.split={split!r} has a file of its own '
                     f'({key}.files.{split}); hold out a split that has none')
  cut = 1.0 - fraction
  splits['train'] = Split(splits['train'].file, (0.0, cut))
  splits[split] = Split(splits['train'].file, (cut, 1.0))
  return _in_order(splits)


def _in_order(splits: dict[str, Split]) -> dict[str, Split]:
  """train, dev, test first (a ConfigDict sorts its keys), then any other split by name."""
  order = [s for s in SPLIT_KEYS if s in splits] + sorted(set(splits) - set(SPLIT_KEYS))
  return {split: splits[split] for split in order}
