"""Exact match: the answer extractor on GSM8K's real answers, normalization, the metric's ends."""

import json
import os

import pytest

from additive_jax.eval.exact_match import Extractor, exact_match, normalize
from conftest import SHARED_DATA


def gsm8k_answers():
  for split in ('train', 'test'):
    with open(os.path.join(SHARED_DATA, 'gsm8k', f'{split}.jsonl'), encoding='utf-8') as f:
      yield from (json.loads(line)['answer'] for line in f)


def test_the_extractor_recovers_every_reference_number_of_gsm8k():
  answers = list(gsm8k_answers())
  assert len(answers) == 7473 + 1319
  for answer in answers:
    written = answer.split('#### ')[-1].strip()  # the dataset's own convention, read plainly
    value = float(written.replace(',', ''))
    extracted = Extractor()(answer)
    assert extracted is not None and float(extracted) == value, answer[-60:]
  # the worked solution before '####' holds other numbers: the extractor takes the final one
  assert Extractor()('She sold 48/2 = 24 clips.\n#### 72') == '72'


@pytest.mark.parametrize('text, answer', [
    ('#### 1,000', '1000'), ('#### $18.', '18'), ('#### 18.0', '18'), ('#### -3', '-3'),
    ('#### 0.5', '0.5'), ('so the answer is 12 apples, or 12.', '12'), ('no number here', None),
    ('#### ', None), ('The total is $1,250.00.', '1250'),
])
def test_normalized_answers(text, answer):
  assert Extractor()(text) == answer


def test_a_regex_extractor_takes_its_first_group():
  extract = Extractor(r'answer is (\S+)')
  assert extract('I think the answer is 42.') == '42'
  assert extract('nothing') is None
  assert Extractor(r'\d+')('a 7 b') == '7'
  with pytest.raises(ValueError, match=r"the answer regex '\(unclosed' does not compile"):
    Extractor('(unclosed')


def test_copying_the_reference_scores_one_and_nothing_scores_zero():
  references = list(gsm8k_answers())[:200]
  assert exact_match(references, references) == 1.0
  assert exact_match([''] * len(references), references) == 0.0
  assert normalize(' $1,000. ') == '1000'
  with pytest.raises(ValueError, match='2 predictions for 1 references'):
    exact_match(['a', 'b'], ['a'])
