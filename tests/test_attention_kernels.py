"""additive_jax.model.attention: every implementation against one reference mask.

The reference builds the mask with loops straight from the definition (attention.py's
docstring) and attends in float64 numpy. 'xla' is checked against it; the kernels ('pallas',
'splash', both in Pallas's interpreter here) against 'xla', forward and gradients. The rows
are one of each kind: packed (three segments, trailing padding), left-padded and
right-padded (ids = the attention mask). T = 45 is no multiple of the 16-slot blocks the
Pallas kernel is given, so padding, several key blocks and skipped blocks all occur.

Error measure: rel(a, b) = max |a − b| / max |b|. fp32: ≤ 1e-5 (what is seen: ≤ 5e-7).
bf16 forward: ≤ 2e-2 against fp32 attention of the same bf16 inputs (bf16 keeps 8 bits:
each rounding, of the probabilities before p·v and of the output, costs up to 2^-9 ≈ 2e-3
relative; what is seen: ≤ 4e-3, as 'xla' itself in bf16: 3e-3).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from additive_jax.model import attention, flash_pallas, verified_kernels

B, T, N, K, H = 3, 45, 4, 2, 16
BLOCK = 16
SEGMENT_IDS = np.array([[1] * 12 + [2] * 17 + [3] * 9 + [0] * 7,  # packed, trailing padding
                        [0] * 10 + [1] * 35,                     # left-padded
                        [1] * 30 + [0] * 15])                    # right-padded
SLOTS = [(0, 0), (3, 0), (0, 4), (3, 4)]  # (num_prefix, num_virtual)
FP32, BF16 = 1e-5, 2e-2


def reference_mask(ids, num_prefix, num_virtual):
  batch, length = ids.shape
  mask = np.zeros((batch, length, num_prefix + length), bool)
  for b in range(batch):
    for t in range(length):
      mask[b, t, :num_prefix] = True
      for source in range(t + 1):  # the key slot of query slot `source`, causally visible
        mask[b, t, num_prefix + source] = source < num_virtual or ids[b, source] == ids[b, t]
  return mask


def reference_attention(q, k, v, mask):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('btnh,bsnh->bnts', q, k) / math.sqrt(q.shape[-1])
  scores = np.where(mask[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum('bnts,bsnh->btnh', probs / probs.sum(-1, keepdims=True), v)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def inputs(num_prefix, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, T, N, H), dtype)
  k = jax.random.normal(keys[1], (B, num_prefix + T, K, H), dtype)
  v = jax.random.normal(keys[2], (B, num_prefix + T, K, H), dtype)
  return q, k, v, jax.random.normal(keys[3], (B, T, N, H))


def pallas(q, k, v, ids, num_prefix, num_virtual):
  return flash_pallas.flash_attention(q, k, v, ids, num_prefix=num_prefix, num_virtual=num_virtual,
                                      block_q=BLOCK, block_k=BLOCK, interpret=True)


def splash(q, k, v, ids, num_prefix, num_virtual):
  return attention.attend(q, k, v, ids, num_prefix=num_prefix, num_virtual=num_virtual,
                          implementation='splash', interpret=True)


def xla(q, k, v, ids, num_prefix, num_virtual):
  return attention.attend(q, k, v, ids, num_prefix=num_prefix, num_virtual=num_virtual)


KERNELS = {'pallas': pallas, 'splash': splash}


def forward_and_grads(fn, q, k, v, w, num_prefix, num_virtual):
  """The output and the gradients of the random linear functional Σ w ⊙ out."""
  ids = jnp.asarray(SEGMENT_IDS)
  loss = lambda q, k, v: jnp.sum(w * fn(q, k, v, ids, num_prefix, num_virtual))
  return fn(q, k, v, ids, num_prefix, num_virtual), jax.grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize('num_prefix, num_virtual', SLOTS)
def test_xla_matches_the_reference(num_prefix, num_virtual):
  q, k, v, _ = inputs(num_prefix)
  expected = reference_attention(q, k, v, reference_mask(SEGMENT_IDS, num_prefix, num_virtual))
  assert rel(xla(q, k, v, jnp.asarray(SEGMENT_IDS), num_prefix, num_virtual), expected) <= FP32


def todays_mask_BTS(attention_mask_BT, segment_ids_BT, virtual, prefix):
  """The mask as Llama.__call__ and Llama._context built it before attention.attend (no
  cache), copied here so the comparison outlives the model's switch to attend."""
  batch = attention_mask_BT.shape[0]
  mask_BT = jnp.concatenate([jnp.ones((batch, virtual), bool), attention_mask_BT.astype(bool)], 1)
  slot_S = jnp.arange(mask_BT.shape[1])
  mask_BTS = (slot_S[None, None, :] <= slot_S[None, :, None]) & mask_BT[:, None, :]
  if segment_ids_BT is not None:
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    mask_BTS &= jnp.pad(same_BTS, ((0, 0), (virtual, 0), (virtual, 0)), constant_values=True)
  if prefix:
    mask_BTS = jnp.concatenate([jnp.ones((batch, mask_BT.shape[1], prefix), bool), mask_BTS], -1)
  return mask_BTS, mask_BT


@pytest.mark.parametrize('num_prefix, num_virtual', [(0, 0), (3, 4)])
@pytest.mark.parametrize('packed', [True, False])
def test_xla_equals_todays_model_mask(packed, num_prefix, num_virtual):
  """On every real query; today's padding queries saw nothing (an all-False row), the
  definition's see padding: their outputs are never used."""
  tokens = jnp.asarray(SEGMENT_IDS) if packed else jnp.asarray(SEGMENT_IDS != 0, jnp.int32)
  today_BTS, real_BT = todays_mask_BTS(tokens != 0, tokens if packed else None, num_virtual,
                                       num_prefix)
  # prompt vectors get whatever ids (7 here): attend never reads them
  ids_BT = jnp.concatenate([jnp.full((B, num_virtual), 7, jnp.int32), tokens], axis=1)
  new_BTS = attention.mask_BTS(ids_BT, num_prefix, num_virtual)
  real = np.asarray(real_BT)
  np.testing.assert_array_equal(np.asarray(new_BTS)[real], np.asarray(today_BTS)[real])

  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (B, num_virtual + T, N, H))
  k, v = (jax.random.normal(key, (B, num_prefix + num_virtual + T, K, H)) for key in keys[1:])
  today = jax.nn.dot_product_attention(q, k, v, mask=today_BTS[:, None])
  new = xla(q, k, v, ids_BT, num_prefix, num_virtual)
  np.testing.assert_allclose(np.asarray(new)[real], np.asarray(today)[real], rtol=0, atol=1e-6)


@pytest.mark.parametrize('num_prefix, num_virtual', SLOTS)
@pytest.mark.parametrize('name', KERNELS)
def test_kernel_matches_xla_forward_and_gradients(name, num_prefix, num_virtual):
  q, k, v, w = inputs(num_prefix)
  expected_out, expected_grads = forward_and_grads(xla, q, k, v, w, num_prefix, num_virtual)
  if name == 'splash' and (num_prefix, num_virtual) in [(3, 0), (0, 4)]:
    # forward only, to stay within the test budget: splash's interpreted backward compiles for
    # ~6 s a configuration, and (3, 4) runs every line these two do (and the ones between)
    out = splash(q, k, v, jnp.asarray(SEGMENT_IDS), num_prefix, num_virtual)
    assert rel(out, expected_out) <= FP32
    return
  out, grads = forward_and_grads(KERNELS[name], q, k, v, w, num_prefix, num_virtual)
  assert rel(out, expected_out) <= FP32
  for grad, expected, wrt in zip(grads, expected_grads, 'qkv'):
    assert rel(grad, expected) <= FP32, f'd/d{wrt}'


@pytest.mark.parametrize('name', KERNELS)
def test_kernel_bf16_forward(name):
  q, k, v, _ = inputs(3, jnp.bfloat16)
  out = KERNELS[name](q, k, v, jnp.asarray(SEGMENT_IDS), 3, 4)
  assert out.dtype == jnp.bfloat16
  as_fp32 = [x.astype(jnp.float32) for x in (q, k, v)]
  assert rel(out, xla(*as_fp32, jnp.asarray(SEGMENT_IDS), 3, 4)) <= BF16


def test_attend_dispatches_to_the_pallas_kernel():
  """Through attend, with the kernel's default (one-block, here) sizes."""
  q, k, v, _ = inputs(3)
  ids = jnp.asarray(SEGMENT_IDS)
  out = attention.attend(q, k, v, ids, num_prefix=3, num_virtual=4, implementation='pallas',
                         interpret=True)
  assert rel(out, xla(q, k, v, ids, 3, 4)) <= FP32


@pytest.mark.parametrize('name', ['xla', 'pallas', 'splash'])
def test_a_query_depends_on_exactly_the_keys_it_sees(name):
  """d out[b, t_b] / d v[b, j] ≠ 0 iff query t_b sees slot j: masked keys are really masked
  (a masked probability is exactly 0) and visible ones really visible. One probe query a row
  (rows are independent), in the packed row's third segment, the left-padded row's padding
  (which sees prefix, virtual slots and padding) and the right-padded row's tokens."""
  fn = {'xla': xla, **KERNELS}[name]
  num_prefix, num_virtual = 3, 4
  probes = np.array([33, 6, 20])
  q, k, v, _ = inputs(num_prefix)
  ids = jnp.asarray(SEGMENT_IDS)
  probe_out = lambda v: jnp.sum(fn(q, k, v, ids, num_prefix, num_virtual)[jnp.arange(B), probes])
  seen_BS = np.abs(np.asarray(jax.grad(probe_out)(v))).sum(axis=(2, 3)) > 0
  expected_BS = reference_mask(SEGMENT_IDS, num_prefix, num_virtual)[np.arange(B), probes]
  np.testing.assert_array_equal(seen_BS, expected_BS)


@pytest.mark.parametrize('name', ['xla', 'pallas', 'splash'])
def test_outputs_change_with_the_segment_ids(name):
  """Merging the packed row's first two segments lets segment 2 see segment 1: its outputs
  change; segment 1's, which sees nothing new, do not."""
  fn = {'xla': xla, **KERNELS}[name]
  q, k, v, _ = inputs(0)
  merged = SEGMENT_IDS.copy()
  merged[0, 12:29] = 1
  apart = fn(q, k, v, jnp.asarray(SEGMENT_IDS), 0, 0)
  together = fn(q, k, v, jnp.asarray(merged), 0, 0)
  assert np.abs(np.asarray(apart - together)[0, 12:29]).min(axis=(1, 2)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(apart)[0, :12], np.asarray(together)[0, :12])


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
@pytest.mark.parametrize('num_prefix, num_virtual', [(0, 0), (3, 4)])
def test_cudnn_matches_xla(num_prefix, num_virtual):
  q, k, v, w = inputs(num_prefix, jnp.bfloat16)
  cudnn = lambda *args: attention.attend(*args[:4], num_prefix=args[4], num_virtual=args[5],
                                         implementation='cudnn')
  as_fp32 = [x.astype(jnp.float32) for x in (q, k, v)]
  out, grads = forward_and_grads(cudnn, q, k, v, w, num_prefix, num_virtual)
  expected_out, expected_grads = forward_and_grads(xla, *as_fp32, w, num_prefix, num_virtual)
  assert rel(out, expected_out) <= BF16
  for grad, expected in zip(grads, expected_grads):
    assert rel(grad, expected) <= 5e-2  # bf16 gradients: two more bf16 products deep


def test_resolve():
  # no kernel has run on a GPU or a TPU yet: 'auto' is 'xla' on every backend
  assert verified_kernels.CHECKED == ()
  for backend in ('cpu', 'gpu', 'tpu'):
    assert attention.resolve('auto', backend, 'NVIDIA H100 80GB HBM3') == 'xla'
  assert attention.resolve('auto') == 'xla'
  for name in attention.IMPLEMENTATIONS[1:]:
    assert attention.resolve(name, 'tpu') == name
  with pytest.raises(ValueError, match="'flash'.*auto, xla, cudnn, splash, pallas"):
    attention.resolve('flash')


def test_auto_takes_a_kernel_only_where_the_table_lists_it():
  h100 = verified_kernels.Checked('cudnn', 'gpu', 'NVIDIA H100', '0.11', '0.12', '2026-12-07',
                                  'device_check.json')
  pallas_v5 = verified_kernels.Checked('pallas', 'tpu', 'TPU v5', '0.10.2', '0.11', '2026-12-07',
                                       'device_check.json')
  table = (h100, pallas_v5)
  auto = lambda *where: verified_kernels.auto_kernel(*where, checked=table)
  assert auto('gpu', 'NVIDIA H100 80GB HBM3', '0.11.2') == 'cudnn'
  assert auto('gpu', 'NVIDIA H100 80GB HBM3', '0.10.2') == 'xla'   # another jax
  assert auto('gpu', 'NVIDIA H100 80GB HBM3', '0.12.0') == 'xla'
  assert auto('gpu', 'NVIDIA A100-SXM4-40GB', '0.11.2') == 'xla'   # another device kind
  assert auto('tpu', 'TPU v5 lite', '0.10.2') == 'pallas'          # splash preferred, unlisted
  assert auto('cpu', 'cpu', '0.10.2') == 'xla'
  assert verified_kernels.version('0.11.2.dev20261201') == (0, 11, 2)


# Lowering for the accelerators, done here on CPU: Pallas's Triton and Mosaic lowerings and
# the splash call run, the GPU and TPU compilers do not (export's custom-call check is off).

def _export(fn, platform, custom_call):
  q, k = (jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in [(2, 256, N, 64), (2, 259, K, 64)])
  ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)

  def step(q, k, v, ids):
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, ids), q, k, v)
    return out, pull(out)

  check = jax.export.DisabledSafetyCheck.custom_call(custom_call)
  return jax.export.export(jax.jit(step), platforms=[platform], disabled_checks=[check])(
      q, k, k, ids).mlir_module()


def test_pallas_lowers_with_triton_for_gpus():
  fn = lambda q, k, v, ids: flash_pallas.flash_attention(q, k, v, ids, num_prefix=3,
                                                         num_virtual=4, platform='gpu')
  assert _export(fn, 'cuda', '__gpu$xla.gpu.triton').count('__gpu$xla.gpu.triton') == 3


@pytest.mark.parametrize('name', ['pallas', 'splash'])
def test_lowers_with_mosaic_for_tpus(name):
  fn = lambda q, k, v, ids: attention.attend(q, k, v, ids, num_prefix=3, num_virtual=4,
                                             implementation=name, interpret=False)
  if name == 'pallas':
    fn = lambda q, k, v, ids: flash_pallas.flash_attention(q, k, v, ids, num_prefix=3,
                                                           num_virtual=4, platform='tpu')
  tpu = jax.sharding.AbstractDevice(device_kind='TPU v5 lite', num_cores=1, platform='tpu')
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('x',), abstract_device=tpu)):
    assert _export(fn, 'tpu', 'tpu_custom_call').count('tpu_custom_call') >= 3
