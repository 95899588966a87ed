"""An attention kernel run once at a run's own block shape, against 'xla', before its first step.

    name, note = choose_attention(config.attention, BlockShape(seq_len=128, heads=9,
                                  kv_heads=3, head_dim=64, dtype=jnp.float32))

Whether a Pallas/Triton or cuDNN kernel compiles depends on the block it is given
(sequence length, head dim, dtype, prefix and prompt slot counts: Triton's shared-memory
limits), so the kernel a run would use is compiled and run at that shape, forward and
the q/k/v gradients of a random functional, on two rows (one packed with padding, one
left-padded), and compared with 'xla' in fp32 on the same inputs. If it fails to
compile, raises, or differs beyond the dtype's tolerance, an 'auto' run takes 'xla' and
says so in one line naming the kernel and the reason; a kernel named in the config is a
one-line error instead. The choice is made here, once: never a switch during a run.
A Pallas kernel on a CPU runs in Pallas's interpreter, orders of magnitude slower than
'xla' (for tests): that gets a one-line note.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from additive_jax.model import attention

# Largest |kernel − xla| / max |xla|, per output, allowed: fp32 up to summation order; bf16
# inputs (the reference stays fp32) carry bf16's rounding, the gradients two products deeper.
TOLERANCE = {'float32': (1e-4, 1e-4), 'bfloat16': (2e-2, 5e-2), 'float16': (5e-3, 2e-2)}


@dataclasses.dataclass(frozen=True)
class BlockShape:
  """What a kernel's blocks depend on (the query length is `num_virtual + seq_len`)."""
  seq_len: int
  heads: int
  kv_heads: int
  head_dim: int
  dtype: Any
  num_prefix: int = 0
  num_virtual: int = 0


def probe_inputs(shape: BlockShape, rows: int = 2):
  length = shape.num_virtual + shape.seq_len
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (rows, length, shape.heads, shape.head_dim))
  k, v = (jax.random.normal(key, (rows, shape.num_prefix + length, shape.kv_heads,
                                  shape.head_dim)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)
  ids = np.zeros((rows, length), np.int32)
  cut = max(1, length // 3)
  ids[0, :cut], ids[0, cut:length - cut // 2] = 1, 2     # packed: two segments, then padding
  ids[1:, length // 4:] = 1                              # left-padded
  return q, k, v, jnp.asarray(ids), cotangent


def forward_and_grads(name: str, shape: BlockShape, q, k, v, ids, cotangent):
  def attend(q, k, v):
    return attention.attend(q, k, v, ids, num_prefix=shape.num_prefix,
                            num_virtual=shape.num_virtual, implementation=name)
  out, pull = jax.vjp(attend, q, k, v)
  return out, pull(cotangent.astype(out.dtype))


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def probe(name: str, shape: BlockShape) -> str | None:
  """None if kernel `name` compiles, runs and agrees with 'xla' at `shape`; else why not, in
  one line."""
  q, k, v, ids, cotangent = probe_inputs(shape)
  dtype = jnp.dtype(shape.dtype)
  low = tuple(x.astype(dtype) for x in (q, k, v))
  try:
    out, grads = jax.jit(forward_and_grads, static_argnums=(0, 1))(
        name, shape, *low, ids, cotangent)
    out, grads = jax.device_get((out, grads))
  except Exception as err:  # pylint: disable=broad-except  # a compiler's or a kernel's
    first_line = (str(err).strip().splitlines() or [''])[0][:300]
    return f'it failed at this shape ({type(err).__name__}: {first_line})'
  exact = tuple(x.astype(jnp.float32) for x in low)  # the same rounded inputs, in fp32
  expected_out, expected_grads = jax.jit(forward_and_grads, static_argnums=(0, 1))(
      'xla', shape, *exact, ids, cotangent)
  forward_tol, grad_tol = TOLERANCE.get(dtype.name, TOLERANCE['float32'])
  errors = [('output', relative_error(out, expected_out), forward_tol)]
  errors += [(f'd{part}', relative_error(grad, expected), grad_tol)
             for part, grad, expected in zip('qkv', grads, expected_grads)]
  for what, error, tol in errors:
    if not error <= tol:  # NaN fails too
      return f"its {what} differs from 'xla' by {error:.2e} (relative; {dtype.name} allows {tol:.0e})"
  return None


def describe(shape: BlockShape) -> str:
  return (f'T={shape.seq_len}, head dim {shape.head_dim}, {jnp.dtype(shape.dtype).name}, '
          f'{shape.num_prefix} prefix and {shape.num_virtual} prompt slots')


def choose_attention(requested: str, shape: BlockShape) -> tuple[str, str | None]:
  """(the implementation a run uses, a line to print or None). `requested` is the config's
  `attention`: 'auto' falls back to 'xla' with a line; a named kernel that fails at `shape`
  raises attention.KernelUnavailable in one line."""
  name = attention.resolve(requested)
  if name == 'xla':
    return name, None
  try:
    attention.kernel_module(name)
    reason = probe(name, shape)
  except attention.KernelUnavailable as err:
    if requested != 'auto':
      raise
    reason = str(err)
  if reason is not None:
    if requested == 'auto':
      return 'xla', (f"attention: 'auto' would run {name!r} on this "
                     f"{jax.devices()[0].device_kind}, but {reason}; running 'xla'")
    raise attention.KernelUnavailable(
        f"config.attention={name!r} at this run's shape ({describe(shape)}): {reason}; use "
        "--config.attention=xla (or auto)")
  if jax.default_backend() == 'cpu':
    return name, (f'attention: {name!r} on a CPU runs in the Pallas interpreter, orders of '
                  "magnitude slower than 'xla' (meant for tests)")
  return name, None
