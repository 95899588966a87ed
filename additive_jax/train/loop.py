"""The training loop: steps, periodic evaluation, metrics, checkpoints, exact resume.

    summary = train_and_evaluate(config, workdir)

A run reports its trainable parameters first, scores the classification
accuracy before training (when the config names a split), trains
`config.num_steps` steps with eval loss every `eval_every`, checkpoints every
`checkpoint_every` (and at the end), and scores the accuracy again. If the
workdir already holds a checkpoint, the run resumes from the latest: the
trainable state, the optimizer state and the data iterator's position, so the
losses that follow are those of a run that never stopped.

Metrics go to TensorBoard event files and `metrics.jsonl` in the workdir
(process 0 only), the summary to `summary.json`. A resumed run first drops the
logged metrics of steps after its checkpoint (a killed run may have logged
them), so each step keeps one line, that of the run that went on.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from additive_jax.data.pipeline import make_eval_batches, make_train_iterator
from additive_jax.eval.accuracy import classification_accuracy
from additive_jax.peft.count import count_methods, format_table
from additive_jax.train.checkpoint import Checkpoints, abstract_like
from additive_jax.train.mesh import batch_sharding
from additive_jax.train.metrics import MetricsWriter
from additive_jax.train.optimizer import learning_rates
from additive_jax.train.prepare import Run, build, check_config
from additive_jax.train.step import jit_eval_step, jit_train_step


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows joined with the other processes' into one batch split over the mesh."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, rows)
          for name, rows in local_batch.items()}


def evaluate_loss(run: Run, state, config: ml_collections.ConfigDict, eval_step) -> dict[str, float]:
  """Token-weighted loss (and perplexity) over the first `eval_batches` of the eval split."""
  batches, _ = make_eval_batches(config.data, run.tokenizer, batch_size=config.batch_size,
                                 seq_len=config.seq_len, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  count = len(batches) if not config.eval_batches else min(config.eval_batches, len(batches))
  loss_sum = tokens = 0.0
  for index in range(count):
    out = eval_step(state.peft, run.params, global_batch(batches[index], run.mesh))
    loss_sum += float(out['loss_sum'])
    tokens += float(out['loss_tokens'])
  loss = loss_sum / max(tokens, 1.0)
  return {'eval_loss': loss, 'eval_perplexity': float(np.exp(loss)), 'eval_tokens': tokens}


def accuracy(run: Run, state, config: ml_collections.ConfigDict) -> float:
  variables = {'params': run.params, 'peft': state.peft}
  value, rows = classification_accuracy(run.model, variables, run.tokenizer, config.data,
                                        config.accuracy_split, config.accuracy_limit,
                                        progress=jax.process_index() == 0)
  logging.info('accuracy on %s %s (%d rows): %.4f', config.data.source, config.accuracy_split,
               rows, value)
  return value


def _mean(metrics: list[dict]) -> dict[str, float]:
  return {name: float(np.mean([float(m[name]) for m in metrics])) for name in metrics[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  started = time.time()
  mesh, methods = check_config(config)
  run = build(config, mesh, methods)
  counts = count_methods(methods, run.model.config)
  trainable = sum(c.leaves for c in counts)
  say = print if jax.process_index() == 0 else (lambda *_: None)
  say(format_table(counts, run.model.config.num_base_params))

  train_iterator, length_report = make_train_iterator(
      config.data, run.tokenizer, batch_size=config.batch_size, seq_len=config.seq_len,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  say(f'{config.data.source} {config.data.split}: {length_report}')
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
                            keep_best=config.keep_best)
  summary = {'trainable_params': trainable,
             'trainable_percent': 100 * trainable / run.model.config.num_base_params}
  state = run.state
  latest = checkpoints.latest_step()
  if latest is not None:
    state = checkpoints.restore(latest, abstract_like(state), train_iterator)
    say(f'resumed from step {latest}')
  elif config.accuracy_split:
    summary['accuracy_before'] = accuracy(run, state, config)
    say(f'accuracy before: {summary["accuracy_before"]:.4f}')
  writer = MetricsWriter(workdir, resumed_from=latest)

  train_step = jit_train_step(run.model, run.optimizer, config.accumulation, mesh,
                              run.state_shardings, run.param_shardings)
  eval_step = jit_eval_step(run.model, mesh, run.param_shardings)
  first = int(state.step)
  pending, logged, tick = [], None, time.time()
  progress = tqdm.tqdm(range(first, config.num_steps), initial=first, total=config.num_steps,
                       desc='train', disable=jax.process_index() != 0)
  for step in progress:
    state, metrics = train_step(state, run.params, global_batch(next(train_iterator), mesh))
    pending.append(metrics)
    done = step + 1
    if done % config.log_every == 0 or done == config.num_steps:
      logged = _mean(pending)
      logged['tokens_per_s'] = logged.pop('tokens') * len(pending) / (time.time() - tick)
      logged['trainable_params'] = trainable
      logged.update({f'lr/{k}': v for k, v in
                     learning_rates(run.optimizer_settings, config.num_steps, step).items()})
      writer.write(done, logged)
      progress.set_postfix(loss=f'{logged["loss"]:.4f}')
      pending, tick = [], time.time()
    evaluated = None
    if (config.eval_every and done % config.eval_every == 0) or done == config.num_steps:
      evaluated = evaluate_loss(run, state, config, eval_step)
      writer.write(done, evaluated)
      summary.update(evaluated)
    if done % config.checkpoint_every == 0 or done == config.num_steps:
      checkpoints.save(done, state, train_iterator, config.to_dict(), metrics=evaluated)
  if logged is not None:
    summary['final_loss'] = logged['loss']

  if config.accuracy_split:
    summary['accuracy_after'] = accuracy(run, state, config)
    say(f'accuracy after: {summary["accuracy_after"]:.4f}')
  checkpoints.wait()
  checkpoints.close()
  writer.close()
  summary['wall_time_s'] = time.time() - started
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
  return summary
