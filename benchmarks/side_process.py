"""One side of a side-by-side benchmark in a process of its own, and the pipe to it.

`Side(label, serve, *args)` spawns a fresh interpreter (no memory shared with
another side) running `serve(conn, *args)`: `decode_sides.serve` for
benchmarks/decode.py, `train_step_sides.serve` for benchmarks/train_throughput.py.
`serve` builds its side, sends `('ok', report)`, then answers `(method, args)`
calls with `('ok', value)` until 'finish', or sends `('error', traceback)`. An
idle side blocks on the pipe, so it takes no CPU while another side is timed.
"""

from __future__ import annotations

import multiprocessing


class Side:
  """A side's process and the pipe to it; the constructor returns at once, `wait_ready` takes
  the report (so that several sides warm up at the same time)."""

  def __init__(self, label: str, serve, *args):
    context = multiprocessing.get_context('spawn')  # a fresh interpreter: no memory shared
    self.label = label
    self.conn, child_conn = context.Pipe()
    self.process = context.Process(target=serve, args=(child_conn, *args))
    self.process.start()
    child_conn.close()
    self.report = None

  def wait_ready(self) -> dict:
    self.report = self.answer()
    return self.report

  def call(self, method: str, *args):
    self.conn.send((method, args))
    return self.answer()

  def answer(self):
    try:
      status, value = self.conn.recv()
    except EOFError:
      self.process.join()
      raise RuntimeError(f'the {self.label} side exited (code {self.process.exitcode})'
                         ) from None
    if status == 'error':
      raise RuntimeError(f'the {self.label} side failed:\n{value}')
    return value

  def close(self):
    if self.process.is_alive():
      try:
        self.conn.send(('finish', ()))
      except (BrokenPipeError, OSError):
        pass
    self.process.join(timeout=60)
    if self.process.is_alive():
      self.process.kill()
