"""Task metrics on any declared source: accuracy, exact match, perplexity.

    result = score('exact_match', model, variables, tokenizer, config.data, 'test', limit=200)

  accuracy     the label word the model finds most likely (a label of several tokens scores
               the sum of its tokens' log-probabilities), after the run's template; needs a
               source with a label map (eval/accuracy.py)
  exact_match  greedy generation after the run's template, the answer extracted from it and
               from the reference response compared (eval/exact_match.py: GSM8K's `####` rule
               by default, or a regex)
  perplexity   of the response tokens, token-level and per example (eval/perplexity.py)

`limit` scores a fixed subset (eval/subsets.py: `limit` rows drawn by a fixed seed,
the same at every evaluation of a run and across runs; perplexity, which reads
the split's batches of one example a row, takes its first `limit` rows instead;
0: every row). Each result is a dict whose first entry is the metric itself;
`hits=True` adds accuracy's and exact match's per-row outcomes (`'hits'`: 1 or 0
a row, in the subset's order), what a paired comparison of two runs needs.
"""

from __future__ import annotations

import dataclasses

from additive_jax.data.pipeline import make_eval_batches
from additive_jax.data.sources import read_split, source_spec
from additive_jax.eval.accuracy import classification_accuracy
from additive_jax.eval.exact_match import Extractor, answer_hits
from additive_jax.eval.decode import generate
from additive_jax.eval.perplexity import perplexity
from additive_jax.eval.subsets import subset
from additive_jax.peft.merge import inference_form

METRICS = ('accuracy', 'exact_match', 'perplexity')
# whether a higher value is better, for keeping the best checkpoint
HIGHER_IS_BETTER = {'accuracy': True, 'exact_match': True, 'perplexity': False}


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a metric is scored: the batch shape of perplexity, generation for exact match."""
  batch_size: int = 8
  seq_len: int = 256
  max_new_tokens: int = 256
  answer_regex: str = ''     # exact match: '' is GSM8K's '####' rule
  # Exact match: prompts decoded together. A CPU's products at a few rows run far below
  # its GEMM rate (a decode step of SmolLM2: 71 ms at 8 rows, 510 ms at 100), so wide
  # batches decode many times the rows a second; the cost is the cache, rows x slots.
  decode_rows: int = 64


def check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f'unknown metric {metric!r} (metrics: {", ".join(METRICS)})')


def _exact_match(model, variables, tokenizer, data_config, split, limit, settings):
  rows = list(read_split(source_spec(data_config.source), data_config.data_dir, split))
  chosen = [rows[i] for i in subset(len(rows), limit)]
  # Prompts of like length decode together (a batch is left-padded to its longest).
  order = sorted(range(len(chosen)), key=lambda i: len(chosen[i][1]))
  predictions = [''] * len(chosen)
  for start in range(0, len(order), settings.decode_rows):
    batch = order[start:start + settings.decode_rows]
    texts = generate(model, variables, tokenizer, [chosen[i][1] for i in batch],
                     max_new_tokens=settings.max_new_tokens, chat=data_config.template == 'chat')
    for i, text in zip(batch, texts):
      predictions[i] = text
  extract = Extractor(settings.answer_regex or None)
  hits = answer_hits(predictions, [response for _, _, response in chosen], extract)
  return sum(hits) / len(hits), [int(hit) for hit in hits]


def _perplexity(model, variables, tokenizer, data_config, split, limit, settings) -> dict:
  config = data_config.copy_and_resolve_references()
  config.eval_split = split
  batches, _ = make_eval_batches(config, tokenizer, batch_size=settings.batch_size,
                                 seq_len=settings.seq_len)
  count = len(batches)
  if limit:  # whole batches of one example a row: the first ceil(limit / rows) of them
    count = min(count, -(-limit // settings.batch_size))
  return perplexity(model, variables, [batches[i] for i in range(count)])


def score(metric: str, model, variables, tokenizer, data_config, split: str, limit: int = 0,
          settings: Settings = Settings(), progress: bool = False, hits: bool = False) -> dict:
  """`metric` of (model, variables) on `split` of `data_config`'s source."""
  check_metric(metric)
  model, variables = inference_form(model, variables)
  if metric == 'perplexity':
    return _perplexity(model, variables, tokenizer, data_config, split, limit, settings)
  if metric == 'accuracy':
    value, row_hits = classification_accuracy(model, variables, tokenizer, data_config, split,
                                              limit, progress=progress)
    row_hits = [int(hit) for hit in row_hits]
  else:
    value, row_hits = _exact_match(model, variables, tokenizer, data_config, split, limit,
                                   settings)
  return {metric: value, 'rows': len(row_hits), **({'hits': row_hits} if hits else {})}
