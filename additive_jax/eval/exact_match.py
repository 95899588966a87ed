"""Exact match: the answer extracted from a generated text equals the one extracted from the
reference.

    extract = Extractor()                  # GSM8K's: the number after '####'
    extract = Extractor(r'answer is (\\S+)')  # any regex: its first group (else the whole match)
    score = exact_match(predictions, references, extract)

GSM8K writes its answers as `... #### 72`; a model trained on them does too. The
default extractor takes what follows the last `####`, and, when a text has no
`####`, the last number in it (what an untrained model most often ends with).
Both sides are normalized before comparing: commas inside numbers, `$`, a
trailing period and surrounding whitespace are dropped, and a number is written
in its plain form (`72.0` and `72` are equal, `1,000` and `1000` too). A text
with nothing to extract scores 0, whatever the reference.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

_NUMBER = re.compile(r'-?\$?\d[\d,]*(?:\.\d+)?')


def normalize(answer: str) -> str:
  """The answer without `$`, thousands commas, a trailing period or outer whitespace; a
  number in its plain form."""
  text = answer.strip().replace('$', '').rstrip('.').strip()
  unseparated = text.replace(',', '')
  try:
    value = float(unseparated)
  except ValueError:
    return text
  return str(int(value)) if value.is_integer() else repr(value)


@dataclasses.dataclass(frozen=True)
class Extractor:
  """`extractor(text)` -> the normalized answer, or None. `pattern=None` is GSM8K's rule."""
  pattern: str | None = None

  def __post_init__(self):
    if self.pattern is not None:
      try:
        re.compile(self.pattern)
      except re.error as err:
        raise ValueError(f'the answer regex {self.pattern!r} does not compile: {err}') from None

  def __call__(self, text: str) -> str | None:
    if self.pattern is not None:
      found = re.search(self.pattern, text)
      if found is None:
        return None
      return normalize(found.group(1) if found.groups() else found.group(0))
    if '####' in text:
      answer = text.rsplit('####', 1)[1].strip().split('\n')[0]
      return normalize(answer) if answer else None
    numbers = _NUMBER.findall(text)
    return normalize(numbers[-1]) if numbers else None


def exact_match(predictions: Sequence[str], references: Sequence[str],
                extract: Extractor = Extractor()) -> float:
  """The fraction of predictions whose answer equals their reference's."""
  hits = answer_hits(predictions, references, extract)
  return sum(hits) / len(hits)


def answer_hits(predictions: Sequence[str], references: Sequence[str],
                extract: Extractor = Extractor()) -> list[bool]:
  """Per prediction: whether its answer equals its reference's."""
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions for {len(references)} references')
  if not references:
    raise ValueError('exact match of no examples')
  return [extract(p) is not None and extract(p) == extract(r)
          for p, r in zip(predictions, references)]
