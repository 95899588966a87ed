"""Where an attention kernel has run on real hardware: what `attention='auto'` may pick.

A kernel enters `CHECKED` only from a device check that ran it there
(`benchmarks/device_check.py`: equivalence with 'xla', forward and gradients,
packed, padded, with prefix and prompt slots, in bf16 and fp32; then train steps
whose losses agree), with the date and the result file that shows it. 'auto' takes
the backend's preferred kernel only where an entry matches the backend, the device
kind and the jax version; everywhere else it takes 'xla', which every backend
compiles. Naming a kernel (`--config.attention=cudnn`) still runs it wherever it
lowers, checked at set-up (`model/kernel_probe.py`).

No kernel has an entry yet: none has run on a GPU or a TPU since it was written
(the lowering for both is tested on CPU, `tests/test_attention_kernels.py`). So
'auto' is 'xla' on every backend until a device check says otherwise.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Checked:
  """One kernel checked on one kind of device under a range of jax versions."""
  kernel: str       # 'cudnn' | 'splash' | 'pallas'
  backend: str      # jax.default_backend(): 'gpu' | 'tpu'
  device_kind: str  # a prefix of jax.devices()[0].device_kind, e.g. 'NVIDIA H100'
  jax_from: str     # the first jax version checked ...
  jax_below: str    # ... and the first not covered
  date: str         # of the check, YYYY-MM-DD
  result: str       # the check's JSON, under benchmarks/results/


CHECKED: tuple[Checked, ...] = ()

# What 'auto' prefers on each backend, best first, when CHECKED has it.
PREFERRED = {'gpu': ('cudnn', 'pallas'), 'tpu': ('splash', 'pallas')}


def version(text: str) -> tuple[int, ...]:
  """'0.10.2' -> (0, 10, 2); a suffix such as '.dev20260101' is dropped."""
  return tuple(int(part) for part in re.findall(r'\d+', text)[:3])


def covers(entry: Checked, kernel: str, backend: str, device_kind: str, jax_version: str) -> bool:
  return (entry.kernel == kernel and entry.backend == backend
          and device_kind.startswith(entry.device_kind)
          and version(entry.jax_from) <= version(jax_version) < version(entry.jax_below))


def auto_kernel(backend: str, device_kind: str, jax_version: str,
                checked: tuple[Checked, ...] | None = None) -> str:
  """The kernel 'auto' runs: the backend's most preferred one that `checked` (default
  CHECKED) lists for this device and jax, else 'xla'."""
  checked = CHECKED if checked is None else checked
  for kernel in PREFERRED.get(backend, ()):
    if any(covers(entry, kernel, backend, device_kind, jax_version) for entry in checked):
      return kernel
  return 'xla'
