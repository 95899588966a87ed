"""Row templates: a `str.format` string, or Jinja2 when the text holds `{{`, `{%` or `{#`.

    Template('Review: {sentence}\\nSentiment:', 'config.data.source.prompt').render(values)

`str.format` covers a fixed layout; Jinja2 adds what it cannot say, an optional
section (`{% if input %}### Input:\\n{{ input }}\\n\\n{% endif %}`). Either way
`fields` are the row fields the template reads, and a row must have each of them
(possibly empty): a misspelt field fails on the first row instead of rendering as
nothing. Jinja2 renders with `StrictUndefined` for the same reason, and keeps
the text exactly as written (no block trimming, the trailing newline kept).

A `{{` in a `str.format` template (an escaped brace) would make it Jinja2: write
such a template in Jinja2.
"""

from __future__ import annotations

import string
from typing import Mapping

import jinja2
import jinja2.meta

_JINJA_MARKS = ('{{', '{%', '{#')
_ENVIRONMENT = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                  autoescape=False)


def is_jinja(text: str) -> bool:
  return any(mark in text for mark in _JINJA_MARKS)


class Template:
  """A compiled template; `key` names it in errors (the config key it came from)."""

  def __init__(self, text: str, key: str):
    self.text, self.key = text, key
    if is_jinja(text):
      try:
        self._jinja = _ENVIRONMENT.from_string(text)
        self.fields = frozenset(jinja2.meta.find_undeclared_variables(_ENVIRONMENT.parse(text)))
      except jinja2.TemplateSyntaxError as err:
        raise ValueError(f'{key}: Jinja2 syntax error on line {err.lineno} of the template: '
                         f'{err.message} ({text!r})') from None
      except RecursionError:  # Jinja2's parser recurses once per nested bracket
        raise ValueError(f'{key}: the template nests too deeply for Jinja2 '
                         f'({text!r:.80})') from None
    else:
      self._jinja = None
      self.fields = frozenset(self._format_fields(text, key))

  @staticmethod
  def _format_fields(text: str, key: str) -> set[str]:
    try:
      parsed = list(string.Formatter().parse(text))
    except ValueError as err:
      raise ValueError(f'{key}: bad str.format template {text!r}: {err}') from None
    fields = set()
    for _, name, spec, conversion in parsed:
      if name is None:
        continue
      field = name.split('.')[0].split('[')[0]
      if not field or field.isdigit():
        raise ValueError(f'{key}: template {text!r} has a positional {{{name}}}; name a field '
                         'of the row, e.g. {sentence}')
      if conversion not in (None, 'r', 's', 'a'):
        raise ValueError(f'{key}: template {text!r} converts {{{name}}} with !{conversion}; '
                         'str.format knows !r, !s and !a')
      fields.add(field)
      fields |= Template._format_fields(spec, key)  # `{a:>{width}}` reads `width` too
    return fields

  def render(self, values: Mapping[str, object]) -> str:
    """The text for `values` (which hold every one of `fields`); any failure → ValueError."""
    try:
      if self._jinja is None:
        return self.text.format(**values)
      return self._jinja.render(**values)
    except jinja2.TemplateError as err:
      raise ValueError(f'{self.key}: {err}') from None
    # A template is code run on each row's text: `{a[9]}` on a shorter field is an IndexError,
    # `{a:d}` a ValueError, `{{ a / 2 }}` a TypeError. Each is this template's failure on this row.
    except Exception as err:
      raise ValueError(f'{self.key}: template {self.text!r:.80} fails on this row: '
                       f'{type(err).__name__}: {err}') from None
