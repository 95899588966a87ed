"""What a run measures besides its training loss: eval loss and its task metric.

The eval batches are built once per run (building them tokenizes the eval split)
and reused at every evaluation; evaluation reads the trainables as they are,
with a prefix's reparameterization evaluated once (`peft.inference_form`).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from additive_jax.data.pipeline import make_eval_batches
from additive_jax.eval.metrics import Settings, score
from additive_jax.peft.merge import inference_form
from additive_jax.train.mesh import global_batch
from additive_jax.train.prepare import Run
from additive_jax.train.step import jit_eval_step


class LossEvaluator:
  """`evaluator(state)` -> token-weighted eval loss, perplexity and token count over the first
  `config.eval_batches` batches of `config.data.eval_split` (all of them for 0); the LM head
  at `budget` loss positions a row, as in training."""

  def __init__(self, run: Run, config: ml_collections.ConfigDict, budget: int | None = None):
    self.run = run
    self.batches, self.report = make_eval_batches(
        config.data, run.tokenizer, batch_size=config.batch_size, seq_len=config.seq_len,
        process_index=jax.process_index(), process_count=jax.process_count())
    self.count = min(config.eval_batches or len(self.batches), len(self.batches))
    self.step = jit_eval_step(run.model, run.mesh, config.rules, run.param_shardings, budget)

  def __call__(self, state) -> dict[str, float]:
    loss_sum = tokens = 0.0
    for index in range(self.count):
      out = self.step(state.peft, self.run.params, global_batch(self.batches[index], self.run.mesh))
      loss_sum += float(out['loss_sum'])
      tokens += float(out['loss_tokens'])
    loss = loss_sum / max(tokens, 1.0)
    return {'eval_loss': loss, 'eval_perplexity': float(np.exp(loss)), 'eval_tokens': tokens}


def metric_settings(config: ml_collections.ConfigDict) -> Settings:
  return Settings(batch_size=config.batch_size, seq_len=config.seq_len,
                  max_new_tokens=config.max_new_tokens, answer_regex=config.answer_regex)


def task_metric(run: Run, state, config: ml_collections.ConfigDict, metric: str, split: str,
                limit: int, hits: bool = False) -> dict:
  """`metric` (accuracy, exact_match, perplexity) of the trainables in `state` on `split`
  (a fixed subset of `limit` rows; 0: all), the trainables in their inference form; `hits`
  adds the per-row outcomes (eval/metrics.py)."""
  model, variables = inference_form(run.model, {'params': run.params, 'peft': state.peft})
  result = score(metric, model, variables, run.tokenizer, config.data, split, limit,
                 metric_settings(config), progress=jax.process_index() == 0, hits=hits)
  return result
