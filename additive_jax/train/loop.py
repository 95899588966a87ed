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

It reads as its phases: `prepare` (the base, the data, the checkpoints, a
resume), `test_before`, `train` (steps, log lines, evaluations, checkpoints,
preemption), `test_after` and `summarize`. The metrics writer, the checkpoint
manager, the signal handlers and the progress bar are closed on every way out:
a finished run, a preempted one, a non-finite stop or an exception. What a run
writes where is `train.workdir`'s (metrics to TensorBoard event files and
`metrics.jsonl` or a bucket's `metrics/`, process 0 only; the summary to
`summary.json`). A resumed run first drops the logged metrics of steps after its
checkpoint (a killed run may have logged them), so each step keeps one line, that of the
run that went on; it resumes only a workdir whose checkpoint has its config (up to
`checkpoint.RESUMABLE_CHANGES`).

The host reads the steps' metrics only where it must: at a log, evaluation or checkpoint
step (`_settle`), all steps since the last in one transfer. Between those it only
dispatches (an implicit device-to-host read there raises), so on an accelerator it runs
ahead of the device. A non-finite step is found at the next settling: the run stops there
naming it, before anything after it is logged or saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import jax
import ml_collections
import tqdm

from additive_jax.data.mixture import ShareLog
from additive_jax.data.pipeline import make_train_iterator
from additive_jax.peft.param_count import count_methods, format_table
from additive_jax.train.checkpoint import CheckpointError, Checkpoints, abstract_like, config_changes
from additive_jax.train.config_checks import check_config
from additive_jax.train.eval_loss import LossEvaluator, task_metric
from additive_jax.train.final_test import test_and_keep, tested_state
from additive_jax.train.frozen_sources import keep_copies, read_sources
from additive_jax.train.log_window import LogWindow
from additive_jax.train.loss_budget import derive_budget
from additive_jax.train.mesh import global_batch
from additive_jax.train.metrics_log import MetricsWriter
from additive_jax.train.preemption import Preemption
from additive_jax.train.prepare import Run, build
from additive_jax.train.start_from import load_start
from additive_jax.train.step import jit_train_step
from additive_jax.train.step_memory import compiled_bytes, device_peak_bytes
from additive_jax.train.workdir import RunFolder


class NonFiniteError(ValueError):
  """A step's loss or gradient norm was NaN or infinite (config.nonfinite='stop')."""


@dataclasses.dataclass
class Session:
  """What the phases of one run share."""
  config: ml_collections.ConfigDict
  folder: RunFolder
  methods: tuple
  run: Run
  say: Callable[[str], None]   # print on process 0, nothing elsewhere
  iterator: object             # the train batches, a grain iterator (its position checkpointed)
  shares: ShareLog             # a mixture's realized share of each source (empty: one source)
  budget: int | None           # loss positions a row whose logits the step computes
  checkpoints: Checkpoints
  writer: MetricsWriter
  state: object                # the TrainState, restored when the run resumes
  resumed_from: int | None
  trainable: int
  summary: dict


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  started = time.time()
  with contextlib.ExitStack() as closing:
    session = prepare(config, workdir, closing)
    test_before(session)
    preempted_at = train(session)
    if preempted_at is not None:
      return {**session.summary, 'preempted_at': preempted_at}
    test_after(session)
  return summarize(session, started)


def prepare(config, workdir: str, closing: contextlib.ExitStack) -> Session:
  """The run built, its data iterator, its checkpoints opened and, if it has some, resumed
  from the latest; what needs closing is entered into `closing`."""
  start = load_start(config)  # fills an empty config.peft from its adapters
  found = read_sources(config, workdir)  # frozen adapters' sources: their methods into config.peft
  mesh, methods = check_config(config, workdir)
  methods = keep_copies(found, methods, config, workdir)  # and the model reads their copies
  run = build(config, mesh, methods, start.peft if start else None)
  counts = count_methods(methods, run.model.config)
  say = print if jax.process_index() == 0 else (lambda *_: None)
  say(format_table(counts, run.model.config.num_base_params))
  say(run.compute)
  iterator, length_report = make_train_iterator(
      config.data, run.tokenizer, batch_size=config.batch_size, seq_len=config.seq_len,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  # Its prefetch thread stops with the run, however the run ends.
  closing.callback(iterator.close)
  say(f'{"mixture" if config.data.mixture else config.data.source.name} {config.data.split}: '
      f'{length_report}')
  budget = derive_budget(config.loss_positions, iterator, config.seq_len)
  say(f'logits at {budget} loss positions a row' if budget else 'logits at every position')
  folder = RunFolder(workdir)
  checkpoints = closing.enter_context(contextlib.closing(folder.open_checkpoints(config)))
  state, latest = run.state, checkpoints.latest_step()
  if latest is not None:
    state = _resume(checkpoints, latest, state, iterator, config, workdir)
    say(f'resumed from step {latest}')
  writer = closing.enter_context(contextlib.closing(MetricsWriter(folder, resumed_from=latest)))
  shares = ShareLog(iterator)  # counted from the iterator's position, restored or not
  trainable = sum(c.leaves for c in counts)
  summary = {'trainable_params': trainable,
             'trainable_percent': 100 * trainable / run.model.config.num_base_params,
             # the frozen base as stored (in blocks with config.base_quant), all devices' shards
             'base_bytes': sum(x.nbytes for x in jax.tree.leaves(run.params))}
  if any(c.frozen for c in counts):  # adapters a method loads and never trains
    summary['frozen_params'] = sum(c.frozen for c in counts)
  return Session(config, folder, methods, run, say, iterator, shares, budget, checkpoints, writer,
                 state, latest, trainable, summary)


def _resume(checkpoints: Checkpoints, step: int, state, train_iterator, config, workdir):
  """The state saved at `step` (the iterator moved to its position), if the run saved there had
  this config: resuming another experiment's workdir would silently mix two runs."""
  changes = config_changes(checkpoints.restore_config(step), config.to_dict())
  if changes:
    raise CheckpointError(f'{workdir} holds a run with another config, which this one cannot '
                          f'resume ({"; ".join(changes)}): give a new --workdir')
  return checkpoints.restore(step, abstract_like(state), train_iterator)


def test_before(session: Session) -> None:
  """The test metric of the initial trainables, logged at step 0: a resumed run reads it back,
  so it reports the same "before"."""
  config = session.config
  if not (config.test_metric and config.test_before):
    return
  name = config.test_metric
  before = None
  if session.resumed_from is not None:
    before = session.folder.logged_value(name, step=0)
  if before is None:
    before = task_metric(session.run, session.run.state, config, name, config.test_split,
                         config.test_limit)[name]  # the initial state, even after a restore
    session.writer.write(0, {name: before})
  session.summary[f'{name}_before'] = before
  session.say(f'{name} before: {before:.4f}')


def train(session: Session) -> int | None:
  """Steps from the state's to `config.num_steps`; the step a preemption (SIGTERM) or a Ctrl-C
  (SIGINT) saved and stopped at, or None when the run went to its end; the signal's name is
  `summary['stopped_by']`. The signals are the preemption's only while it trains."""
  config, run = session.config, session.run
  train_step = jit_train_step(run.model, run.optimizer, config.accumulation, run.mesh,
                              config.rules, run.state_shardings, run.param_shardings,
                              session.budget)
  evaluate_loss = LossEvaluator(run, config, session.budget)
  session.say(f'{config.data.source.name} {config.data.eval_split}: {evaluate_loss.report}')
  window = LogWindow(run.model.config, session.methods, config, session.budget,
                     session.trainable, run.optimizer_settings)
  first = int(session.state.step)
  if config.num_steps == 0 and first == 0:  # a scoring run keeps what it scores, restorable,
    session.checkpoints.save(0, session.state, session.iterator, config.to_dict(),  # ranked
                             metrics=_evaluate(session, evaluate_loss, 0))  # as any checkpoint
  with contextlib.closing(Preemption()) as preemption, tqdm.tqdm(
      range(first, config.num_steps), initial=first, total=config.num_steps, desc='train',
      disable=jax.process_index() != 0) as progress:
    for step in progress:
      batch = next(session.iterator)
      placed = global_batch(batch, run.mesh)
      if step == first:  # compiled ahead, to read its memory plan; then run as compiled
        train_step = train_step.lower(session.state, run.params, placed).compile()
        session.summary['step_memory_bytes'] = compiled_bytes(train_step)
      # The host reads nothing from the device between log steps, so it dispatches the next
      # steps while the device computes: an implicit read here raises.
      with jax.transfer_guard_device_to_host('disallow'):
        session.state, metrics = train_step(session.state, run.params, placed)
        window.add(step + 1, metrics, batch)
      done = step + 1
      log_now = done % config.log_every == 0 or done == config.num_steps
      evaluating = bool(config.eval_every and done % config.eval_every == 0
                        or done == config.num_steps)
      stopping = preemption.reached(done) and done != config.num_steps
      saving = done % config.checkpoint_every == 0 or done == config.num_steps or stopping
      if not (log_now or evaluating or saving):
        continue
      _settle(session, window)  # every step since the last settles before anything is kept
      if log_now:
        progress.set_postfix(loss=f'{_log(session, window, done):.4f}')
      evaluated = _evaluate(session, evaluate_loss, done) if evaluating else None
      if saving:
        session.checkpoints.save(done, session.state, session.iterator, config.to_dict(),
                                 metrics=evaluated)
      if stopping:  # a preempted run: saved; the next launch with this workdir resumes from it
        session.checkpoints.wait()
        session.say(f'{preemption.cause}: saved step {done} in {session.folder.checkpoints}; '
                    'rerun the same command to resume')
        session.summary['stopped_by'] = preemption.signal_name
        return done
  return None


def _log(session: Session, window: LogWindow, done: int) -> float:
  """The window's line written at step `done`; its loss."""
  line = {**window.close(done), **session.shares.window()}
  session.writer.write(done, line)
  session.summary.update(final_loss=line['loss'], loss_overflows=window.overflows,
                         nonfinite_skipped=window.skipped, tokens_per_s=window.median_speed(),
                         **session.shares.totals())
  return line['loss']


def _settle(session: Session, window: LogWindow) -> None:
  """The steps' metrics since the last settling read in one transfer; the first non-finite
  step among them stops the run (`config.nonfinite='stop'`: nothing after it is logged or
  saved, so every checkpoint on disk is good), or its skipped update is counted."""
  for step, metrics in window.settle():
    if metrics.pop('nonfinite'):
      window.skipped += 1
      if session.config.nonfinite == 'stop':
        _stop_nonfinite(session, step, metrics)


def _stop_nonfinite(session: Session, step: int, metrics: dict) -> None:
  session.checkpoints.wait()
  latest = session.checkpoints.latest_step()
  last_good = 'none (no checkpoint was saved before it)' if latest is None else f'step {latest}'
  raise NonFiniteError(
      f'step {step}: the loss is {float(metrics["loss"])} and the gradient norm '
      f'{float(metrics["grad_norm"])}; the run stops (config.nonfinite=\'stop\'). The last '
      f'good checkpoint is {last_good} in {session.folder.checkpoints}, kept; '
      "resume from it, or set --config.nonfinite=skip to skip such steps' updates")


def _evaluate(session: Session, evaluate_loss: LossEvaluator, done: int) -> dict:
  """The eval loss (and eval metric) at an eval step or the last, logged."""
  config = session.config
  evaluated = evaluate_loss(session.state)
  if config.eval_metric:
    evaluated.update({f'eval_{key}': value for key, value in task_metric(
        session.run, session.state, config, config.eval_metric, config.data.eval_split,
        config.eval_metric_limit).items()})
  session.writer.write(done, evaluated)
  session.summary.update(evaluated)
  if jax.process_index() == 0:  # above the progress bar
    tqdm.tqdm.write(f'step {done}: ' + ', '.join(
        f'{k} {v:.4f}' for k, v in evaluated.items() if k != 'eval_tokens'))
  return evaluated


def test_after(session: Session) -> None:
  """The test metric of the checkpoint `config.test_checkpoint` names; its adapter and each
  test row's outcome kept in the run folder."""
  config = session.config
  if (peak_bytes := device_peak_bytes()) is not None:
    session.summary['device_peak_bytes'] = peak_bytes
  if not config.test_metric:
    return
  name = config.test_metric
  tested, tested_step = tested_state(session.checkpoints, session.state, config)
  session.summary.update(test_and_keep(session.run, tested, tested_step, config, session.folder))
  session.writer.write(config.num_steps, {name: session.summary[f'{name}_after']})
  session.say(f'{name} after: {session.summary[f"{name}_after"]:.4f} (step {tested_step})')


def summarize(session: Session, started: float) -> dict:
  """The summary, with the run's wall time, written whole into `summary.json` (process 0)."""
  summary = {**session.summary, 'wall_time_s': time.time() - started}
  if jax.process_index() == 0:
    session.folder.write_summary(summary)
  return summary
