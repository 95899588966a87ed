"""On a GPU: 'cudnn' and 'pallas' attention against 'xla', then their speed at Llama-3.2-1B shapes.

    .venv/bin/python benchmarks/gpu_attention_check.py [--iterations=20]

Correctness (B=2, T=200, N=8, K=2, H=64; T is no multiple of 128): forward and the gradients
of a random linear functional w.r.t. q, k, v, against 'xla' in fp32 on the same inputs, for
packed rows (with a row of more runs than cuDNN's packed layout takes, which must go to the
Pallas branch at run time), left- and right-padded rows, without and with prefix/virtual
slots (3, 4), in fp32 (≤ 1e-5; 'cudnn' hands fp32 to 'pallas') and bf16 (≤ 2e-2 forward,
≤ 5e-2 gradients). Which path ran is recorded (the hand-over warnings).

Speed (B=8, T=1024, N=32, K=8, H=64, bf16): forward and forward+backward wall time (the
median of --iterations after two warm-up calls) of each implementation on right-padded rows,
packed rows (5 segments and padding) and rows with 20 virtual slots; and, for scale, jax's
plain cuDNN call (jax.nn.dot_product_attention(implementation='cudnn', is_causal=True)), which
knows no segments. Writes benchmarks/results/gpu_attention_check.json.
"""

import json
import os
import statistics
import time
import warnings

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from additive_jax.model import attention

_ITERATIONS = flags.DEFINE_integer('iterations', 20, 'timed calls of each function')
_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                        'gpu_attention_check.json')


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def layouts(batch: int, length: int) -> dict[str, np.ndarray]:
  """Segment-id rows of each kind, `batch` rows each."""
  rng = np.random.default_rng(0)

  def packed(pieces):
    cuts = np.sort(rng.choice(np.arange(8, length - 8), pieces - 1, replace=False))
    ids = np.zeros(length, np.int32)
    for i, (start, end) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, length - 7])):
      ids[start:end] = i + 1
    return ids  # the last 7 slots: padding

  rows = lambda make: np.stack([make(b) for b in range(batch)])
  return {
      'packed': rows(lambda b: packed(5)),
      'packed_many_runs': rows(lambda b: packed(5 if b else 24)),  # row 0: > 16 runs
      'left_padded': rows(lambda b: (np.arange(length) >= 13 * (b + 1)).astype(np.int32)),
      'right_padded': rows(lambda b: (np.arange(length) < length - 17 * b).astype(np.int32)),
  }


def inputs(shape, num_prefix: int, dtype, seed=0):
  batch, length, heads, kv_heads, head_dim = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
  k, v = (jax.random.normal(key, (batch, num_prefix + length, kv_heads, head_dim), dtype)
          for key in keys[1:3])
  return q, k, v, jax.random.normal(keys[3], q.shape, jnp.float32)


def step(implementation: str, num_prefix: int, num_virtual: int):
  """jit(ids, q, k, v, w → out, (dq, dk, dv)) of Σ w ⊙ attend(...)."""
  def attend(q, k, v, ids):
    return attention.attend(q, k, v, ids, num_prefix=num_prefix, num_virtual=num_virtual,
                            implementation=implementation)

  def run(q, k, v, w, ids):
    out, pull = jax.vjp(lambda q, k, v: attend(q, k, v, ids), q, k, v)
    return out, pull(w.astype(out.dtype))
  return jax.jit(run), jax.jit(attend)


def check_correctness() -> list[dict]:
  shape = (2, 200, 8, 2, 64)
  results = []
  for layout, ids in layouts(2, 200).items():
    for num_prefix, num_virtual in [(0, 0), (3, 4)]:
      reference, _ = step('xla', num_prefix, num_virtual)
      for dtype, fwd_tol, grad_tol in [(jnp.float32, 1e-5, 1e-5), (jnp.bfloat16, 2e-2, 5e-2)]:
        q, k, v, w = inputs(shape, num_prefix, dtype)
        expected_out, expected_grads = reference(*(x.astype(jnp.float32) for x in (q, k, v)), w,
                                                 ids)
        for implementation in ['cudnn', 'pallas']:
          with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            out, grads = step(implementation, num_prefix, num_virtual)[0](q, k, v, w, ids)
          errors = [rel(out, expected_out)] + [rel(g, e) for g, e in zip(grads, expected_grads)]
          results.append({
              'implementation': implementation, 'layout': layout, 'num_prefix': num_prefix,
              'num_virtual': num_virtual, 'dtype': jnp.dtype(dtype).name,
              'rel_error_out_dq_dk_dv': errors,
              'passed': errors[0] <= fwd_tol and max(errors[1:]) <= grad_tol,
              'handed_over': [str(c.message) for c in caught if 'hands over' in str(c.message)]})
          print(json.dumps(results[-1]))
  return results


def timed(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_ITERATIONS.value):
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def measure_speed() -> list[dict]:
  shape = (8, 1024, 32, 8, 64)  # Llama-3.2-1B: 32 query heads, 8 kv heads, head dim 64
  ids_by_layout = layouts(8, 1024)
  cases = [('right_padded', 0, 0), ('packed', 0, 0), ('right_padded', 0, 20)]
  results = []
  for layout, num_prefix, num_virtual in cases:
    q, k, v, w = inputs(shape, num_prefix, jnp.bfloat16)
    ids = ids_by_layout[layout]
    for implementation in ['xla', 'cudnn', 'pallas']:
      train, forward = step(implementation, num_prefix, num_virtual)
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        row = {'implementation': implementation, 'layout': layout, 'num_prefix': num_prefix,
               'num_virtual': num_virtual, 'forward_ms': 1e3 * timed(forward, q, k, v, ids),
               'forward_backward_ms': 1e3 * timed(train, q, k, v, w, ids)}
      row['handed_over'] = sorted({str(c.message) for c in caught
                                   if 'hands over' in str(c.message)})
      results.append(row)
      print(json.dumps(row))

  q, k, v, w = inputs(shape, 0, jnp.bfloat16)
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation='cudnn')
  train = jax.jit(lambda q, k, v, w: jax.vjp(plain, q, k, v)[1](w.astype(q.dtype)))
  results.append({'implementation': 'jax.nn cudnn, causal, no segments', 'layout': 'unpadded',
                  'forward_ms': 1e3 * timed(jax.jit(plain), q, k, v),
                  'forward_backward_ms': 1e3 * timed(train, q, k, v, w)})
  print(json.dumps(results[-1]))
  return results


def main(argv):
  del argv
  if jax.default_backend() != 'gpu':
    raise SystemExit(f'needs a GPU; the default backend is {jax.default_backend()}')
  device = jax.devices()[0]
  report = {'device': device.device_kind, 'jax': jax.__version__,
            'correctness': check_correctness(), 'speed': measure_speed()}
  report['all_passed'] = all(r['passed'] for r in report['correctness'])
  os.makedirs(os.path.dirname(_RESULTS), exist_ok=True)
  with open(_RESULTS, 'w') as f:
    json.dump(report, f, indent=1)
  print(f"all passed: {report['all_passed']}; wrote {_RESULTS}")


if __name__ == '__main__':
  app.run(main)
