"""The steps between two log lines: their metrics averaged, with speed, FLOP rate and counters.

    window = LogWindow(run.model.config, methods, config, budget, trainable, optimizer_settings)
    window.add(step, step_metrics, batch)  # every step: nothing read from the device
    read = window.settle()                 # [(step, host metrics)] since the last settling
    line = window.close(step)              # at a log step: the mean of the window, and more

A line holds the window's mean loss, gradient norm and padding fraction, tokens a
second over the window's wall time (the first window holds the compilation), the
model FLOP rate (`train.flops`, the logits counted at the positions each step
computed), MFU where the device's peak is known, the running counts of loss-budget
overflows and skipped non-finite steps, and each method's learning rate.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from additive_jax.model.config import compute_dtype_name
from additive_jax.train.flops import logit_positions, peak_flops, train_step_flops
from additive_jax.train.optimizer import learning_rates


class LogWindow:

  def __init__(self, model_config, methods, config, budget: int | None, trainable: int,
               optimizer_settings: dict):
    self.config, self.trainable, self.optimizer_settings = config, trainable, optimizer_settings
    self.flops_of = functools.partial(train_step_flops, model_config, methods,
                                      rows=config.batch_size, seq_len=config.seq_len)
    self.positions_of = functools.partial(logit_positions, config.batch_size, config.seq_len,
                                          budget, config.accumulation)
    self.peak = peak_flops(jax.devices()[0].device_kind, compute_dtype_name(config.dtype),
                           config.peak_tflops)
    self.unread, self.pending, self.speeds, self.tick = [], [], [], time.time()
    self.overflows = self.skipped = 0

  def add(self, step: int, metrics: dict, batch: dict) -> None:
    """Step `step`'s metrics, left on the device (read by `settle`, not here)."""
    self.unread.append((step, metrics, np.mean(batch['segment_ids'] == 0)))

  def settle(self) -> list[tuple[int, dict]]:
    """The metrics added since the last call, read from the device in one transfer, in step
    order, and kept for the line."""
    read = jax.device_get([metrics for _, metrics, _ in self.unread])
    settled = [(step, {**metrics, 'pad_fraction': pad})
               for (step, _, pad), metrics in zip(self.unread, read)]
    self.unread = []
    self.pending += [dict(metrics) for _, metrics in settled]
    return settled

  def close(self, step: int) -> dict[str, float]:
    """The line of the window that ends with the step just taken (`step` steps done), settled."""
    self.settle()
    seconds = time.time() - self.tick
    for metrics in self.pending:
      metrics.pop('nonfinite', None)
    overflowed = [int(m.pop('loss_overflow')) for m in self.pending]
    self.overflows += sum(overflowed)
    line = {name: float(np.mean([float(m[name]) for m in self.pending]))
            for name in self.pending[0]}
    line['tokens_per_s'] = line.pop('tokens') * len(self.pending) / seconds
    self.speeds.append(line['tokens_per_s'])
    flops = sum(self.flops_of(logit_positions=self.positions_of(n)) for n in overflowed) / seconds
    line['model_tflops_per_s'] = flops / 1e12 / jax.device_count()
    if self.peak:
      line['mfu'] = flops / (jax.device_count() * self.peak)
    line['loss_overflows'] = self.overflows
    line['nonfinite_skipped'] = self.skipped
    line['trainable_params'] = self.trainable
    line.update({f'lr/{k}': v for k, v in learning_rates(
        self.optimizer_settings, self.config.num_steps, step - 1).items()})
    self.pending, self.tick = [], time.time()
    return line

  def median_speed(self) -> float:
    """Tokens a second: the median window after the first, which holds the compilation (when
    there are others)."""
    return float(np.median(self.speeds[1:] or self.speeds))
