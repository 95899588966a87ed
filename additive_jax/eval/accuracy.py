"""Accuracy on a classification source: the label word the model finds most likely.

Each row's prompt is rendered by the run's template (plain or chat) exactly as in
training, and each label word is scored as the response the model was trained
to produce, without its closing EOS (the same for every label). The prediction
is the best-scoring word; accuracy is the fraction equal to the row's label.
"""

from __future__ import annotations

import numpy as np

from additive_jax.data.sources import read_split, source_spec
from additive_jax.data.templates import PairEncoder
from additive_jax.eval.classify import choice_logprobs
from additive_jax.eval.subsets import subset


def classification_accuracy(model, variables, tokenizer, data_config, split: str, limit: int = 0,
                            progress: bool = False) -> tuple[float, np.ndarray]:
  """(accuracy, each scored row's hit: 1 right, 0 wrong) on `split` of `data_config.source` (a
  fixed subset of `limit` rows if > 0, eval/subsets.py, in its order)."""
  spec = source_spec(data_config.source)
  if len(spec.labels) != 1:
    raise ValueError(f'accuracy needs a classification source with one label field; '
                     f'{spec.name!r} has {len(spec.labels)}')
  words = list(next(iter(spec.labels.values())).values())
  rows = list(read_split(spec, data_config.data_dir, split))
  rows = [rows[i] for i in subset(len(rows), limit)]
  encoder = PairEncoder(tokenizer, data_config.template)
  prompt_ids = [ids for ids, _ in encoder([prompt for _, prompt, _ in rows], [words[0]] * len(rows))]
  choice_ids = [response[:-1] for _, response in encoder([rows[0][1]] * len(words), words)]
  labels = np.array([words.index(response) for _, _, response in rows])
  scores = choice_logprobs(model, variables, prompt_ids, choice_ids, pad_id=encoder.eos_id,
                           progress=progress)
  hits = (scores.argmax(axis=1) == labels).astype(np.int8)
  return float(hits.mean()), hits
