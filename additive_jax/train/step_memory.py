"""What one train step holds in memory: the compiled step's own accounting (arguments, outputs
not aliased to them, temporaries), and, where the device keeps one, its allocator's peak.

The compiled figure is what XLA plans for one device; on a CPU it is the only one there is
(the host allocator has no peak counter). `benchmarks/train_throughput.py` counts the same.
"""

from __future__ import annotations

import jax


def compiled_bytes(compiled) -> int:
  """Arguments + outputs − the outputs that reuse an argument's buffer + temporaries."""
  analysis = compiled.memory_analysis()
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def device_peak_bytes() -> int | None:
  """The allocator's peak on this process's first device (GPU, TPU), None where it has none."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None
