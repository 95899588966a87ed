"""The training loop: steps, periodic evaluation, metrics, checkpoints, exact resume.

    summary = train_and_evaluate(config, workdir)

A run reports its trainable parameters first, scores its test metric
(`config.test_metric` on `config.test_split`: accuracy, exact match or
perplexity) before training, trains `config.num_steps` steps with the eval loss
(and `config.eval_metric`, on a fixed subset) every `eval_every`, checkpoints
every `checkpoint_every` (and at the end; the best kept by the eval metric, or
the eval loss), and scores the test metric again. If the
workdir already holds a checkpoint, the run resumes from the latest: the
trainable state, the optimizer state and the data iterator's position, so the
losses that follow are those of a run that never stopped.

Metrics go to TensorBoard event files and `metrics.jsonl` in the workdir
(process 0 only), the summary to `summary.json`. A resumed run first drops the
logged metrics of steps after its checkpoint (a killed run may have logged
them), so each step keeps one line, that of the run that went on; it resumes only
a workdir whose checkpoint has its config (up to `checkpoint.RESUMABLE_CHANGES`).
"""

from __future__ import annotations

import functools
import time

from etils import epath
import jax
import ml_collections
import numpy as np
import tqdm

from additive_jax.data.pipeline import make_train_iterator
from additive_jax.peft.param_count import count_methods, format_table
from additive_jax.peft.files.file_io import write_json
from additive_jax.train.checkpoint import CheckpointError, Checkpoints, abstract_like, config_changes
from additive_jax.train.config_checks import check_config
from additive_jax.eval.metrics import HIGHER_IS_BETTER
from additive_jax.train.eval_loss import LossEvaluator, task_metric
from additive_jax.train.final_test import test_and_keep, tested_state
from additive_jax.train.flops import logit_positions, peak_flops, train_step_flops
from additive_jax.train.loss_budget import derive_budget
from additive_jax.train.mesh import global_batch
from additive_jax.train.metrics_log import MetricsWriter, logged_value
from additive_jax.train.optimizer import learning_rates
from additive_jax.train.preemption import Preemption
from additive_jax.train.prepare import build
from additive_jax.train.step import jit_train_step
from additive_jax.train.step_memory import compiled_bytes, device_peak_bytes


class NonFiniteError(ValueError):
  """A step's loss or gradient norm was NaN or infinite (config.nonfinite='stop')."""


def _last_good(checkpoints: Checkpoints) -> str:
  latest = checkpoints.latest_step()
  return 'none (no checkpoint was saved before it)' if latest is None else f'step {latest}'


def _mean(metrics: list[dict]) -> dict[str, float]:
  return {name: float(np.mean([float(m[name]) for m in metrics])) for name in metrics[0]}


def _resume(checkpoints: Checkpoints, step: int, state, train_iterator, config, workdir):
  """The state saved at `step` (the iterator moved to its position), if the run saved there had
  this config: resuming another experiment's workdir would silently mix two runs."""
  changes = config_changes(checkpoints.restore_config(step), config.to_dict())
  if changes:
    raise CheckpointError(f'{workdir} holds a run with another config, which this one cannot '
                          f'resume ({"; ".join(changes)}): give a new --workdir')
  return checkpoints.restore(step, abstract_like(state), train_iterator)


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
  say(f'{config.data.source.name} {config.data.split}: {length_report}')
  budget = derive_budget(config.loss_positions, train_iterator, config.seq_len)
  say(f'logits at {budget} loss positions a row' if budget else 'logits at every position')
  best_by = f'eval_{config.eval_metric}' if config.eval_metric else 'eval_loss'
  checkpoints = Checkpoints(str(epath.Path(workdir) / 'checkpoints'), keep=config.keep_checkpoints,
                            keep_best=config.keep_best, best_metric=best_by,
                            best_mode='max' if HIGHER_IS_BETTER.get(config.eval_metric) else 'min')
  summary = {'trainable_params': trainable,
             'trainable_percent': 100 * trainable / run.model.config.num_base_params}
  state = run.state
  latest = checkpoints.latest_step()
  if latest is not None:
    state = _resume(checkpoints, latest, state, train_iterator, config, workdir)
    say(f'resumed from step {latest}')
  writer = MetricsWriter(workdir, resumed_from=latest)
  test = functools.partial(task_metric, run, config=config, metric=config.test_metric,
                           split=config.test_split, limit=config.test_limit)
  if config.test_metric and config.test_before:
    name = config.test_metric
    before = logged_value(workdir, name, step=0) if latest is not None else None
    if before is None:  # logged at step 0, so a resumed run reports the same "before"
      before = test(run.state)[name]  # the initial state, even after a restore
      writer.write(0, {name: before})
    summary[f'{name}_before'] = before
    say(f'{name} before: {before:.4f}')

  train_step = jit_train_step(run.model, run.optimizer, config.accumulation, mesh, config.rules,
                              run.state_shardings, run.param_shardings, budget)
  evaluate_loss = LossEvaluator(run, config, budget)
  flops_of = functools.partial(train_step_flops, run.model.config, methods,
                               rows=config.batch_size, seq_len=config.seq_len)
  positions_of = functools.partial(logit_positions, config.batch_size, config.seq_len, budget,
                                   config.accumulation)
  peak = peak_flops(jax.devices()[0].device_kind, config.dtype, config.peak_tflops)
  overflows = skipped = 0
  preemption = Preemption()
  first = int(state.step)
  pending, logged, speeds, tick = [], None, [], time.time()
  progress = tqdm.tqdm(range(first, config.num_steps), initial=first, total=config.num_steps,
                       desc='train', disable=jax.process_index() != 0)
  for step in progress:
    batch = next(train_iterator)
    placed = global_batch(batch, mesh)
    if step == first:  # compiled ahead, to read its memory plan; then run as compiled
      train_step = train_step.lower(state, run.params, placed).compile()
      summary['step_memory_bytes'] = compiled_bytes(train_step)
    state, metrics = train_step(state, run.params, placed)
    if bool(metrics.pop('nonfinite')):
      if config.nonfinite == 'stop':
        checkpoints.wait()  # the last good checkpoint complete on disk before the run ends
        raise NonFiniteError(
            f'step {step + 1}: the loss is {float(metrics["loss"])} and the gradient norm '
            f'{float(metrics["grad_norm"])}; the run stops (config.nonfinite=\'stop\'). The last '
            f'good checkpoint is {_last_good(checkpoints)} in {workdir}/checkpoints, kept; '
            "resume from it, or set --config.nonfinite=skip to skip such steps' updates")
      skipped += 1
    pending.append({**metrics, 'pad_fraction': np.mean(batch['segment_ids'] == 0)})
    done = step + 1
    if done % config.log_every == 0 or done == config.num_steps:
      seconds = time.time() - tick
      overflowed = [int(m.pop('loss_overflow')) for m in pending]
      overflows += sum(overflowed)
      logged = _mean(pending)
      logged['tokens_per_s'] = logged.pop('tokens') * len(pending) / seconds
      speeds.append(logged['tokens_per_s'])
      flops = sum(flops_of(logit_positions=positions_of(n)) for n in overflowed) / seconds
      logged['model_tflops_per_s'] = flops / 1e12 / jax.device_count()
      if peak:
        logged['mfu'] = flops / (jax.device_count() * peak)
      logged['loss_overflows'] = overflows
      logged['nonfinite_skipped'] = skipped
      logged['trainable_params'] = trainable
      logged.update({f'lr/{k}': v for k, v in
                     learning_rates(run.optimizer_settings, config.num_steps, step).items()})
      writer.write(done, logged)
      progress.set_postfix(loss=f'{logged["loss"]:.4f}')
      pending, tick = [], time.time()
    evaluated = None
    if (config.eval_every and done % config.eval_every == 0) or done == config.num_steps:
      evaluated = evaluate_loss(state)
      if config.eval_metric:
        evaluated.update({f'eval_{key}': value for key, value in task_metric(
            run, state, config, config.eval_metric, config.data.eval_split,
            config.eval_metric_limit).items()})
      writer.write(done, evaluated)
      summary.update(evaluated)
    saving = done % config.checkpoint_every == 0 or done == config.num_steps
    stopping = preemption.reached(done) and done != config.num_steps
    if saving or stopping:
      checkpoints.save(done, state, train_iterator, config.to_dict(), metrics=evaluated)
    if stopping:  # a preempted run: saved; the next launch with this workdir resumes from it
      checkpoints.wait()
      checkpoints.close()
      writer.close()
      preemption.close()
      say(f'preempted: saved step {done} in {workdir}/checkpoints; rerun the same command to '
          'resume')
      return {**summary, 'preempted_at': done}
  preemption.close()
  if logged is not None:
    summary['final_loss'] = logged['loss']
    summary['loss_overflows'] = overflows
    summary['nonfinite_skipped'] = skipped
    # the median window after the first, which holds the compilation (when there are others)
    summary['tokens_per_s'] = float(np.median(speeds[1:] or speeds))
  if (peak_bytes := device_peak_bytes()) is not None:
    summary['device_peak_bytes'] = peak_bytes

  if config.test_metric:
    name = config.test_metric
    tested, tested_step = tested_state(checkpoints, state, config)
    summary.update(test_and_keep(run, tested, tested_step, config, workdir))
    writer.write(config.num_steps, {name: summary[f'{name}_after']})
    say(f'{name} after: {summary[f"{name}_after"]:.4f} (step {tested_step})')
  checkpoints.wait()
  checkpoints.close()
  writer.close()
  summary['wall_time_s'] = time.time() - started
  if jax.process_index() == 0:
    write_json(str(epath.Path(workdir) / 'summary.json'), summary)  # whole, then renamed
  return summary
