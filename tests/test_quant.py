"""A base in blocks (model/quant.py, quant_layout.py): the formats against gguf-py's own
quantizers and dequantizer, a GGUF file's blocks kept byte for byte, SmolLM2's logits over
each mode within the documented error, and the refusals (a merge, a bad mode or block)."""

import types

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import additive_jax as aj
from additive_jax.export import _check_writable
from additive_jax.model.gguf_checkpoint import open_gguf
from additive_jax.model.llama import Llama
from additive_jax.model.quant import NF4, QuantizedWeight, dequantize, quantize
from additive_jax.model.quant_layout import layout_for, quantize_params
from additive_jax.peft.files import AdapterFileError
from additive_jax.peft.merge import merge
from conftest import SMOLLM2, TINY, save_tiny_hf_llama

GGUF_TYPES = {'int8': T.Q8_0, 'int4': T.Q4_0, 'int4_min': T.Q4_1}


def weight(seed, shape=(40, 96)):
  w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  w[3, :32] = 0  # an all-zero block: d = 0, codes 0
  w[5, 32:64] = 1.5  # a constant block (Q4_1: max = min)
  return w


@pytest.mark.parametrize('format', list(GGUF_TYPES))
def test_at_blocks_of_32_the_formats_are_ggufs_bit_for_bit(format):
  """gguf-py's quantizer and dequantizer on an HF weight [out, in]; ours along the same rows,
  jitted: equal bit for bit (no fused multiply-add changes Q4_1's d · q + m on this CPU)."""
  w = weight(0)
  reference = gguf.quants.dequantize(gguf.quants.quantize(w, GGUF_TYPES[format]),
                                     GGUF_TYPES[format]).reshape(w.shape)
  ours = quantize(w, format, 32, axis=-1)
  np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(ours)), reference)
  # the bytes too: the packed codes of a block are the file's (low nibbles first)
  raw = gguf.quants.quantize(w, GGUF_TYPES[format]).reshape(40, 3, -1)
  np.testing.assert_array_equal(np.asarray(ours.codes).view(np.uint8), raw[..., -ours.codes.shape[-1]:])


@pytest.mark.parametrize('format,block', [('int8', 16), ('int4', 8), ('int4_min', 64), ('nf4', 64)])
def test_every_weight_is_within_half_a_step_of_its_block_grid(format, block):
  w = weight(1, shape=(128, 24))
  q = quantize(w, format, block, axis=-2)  # blocks along the rows this time: [in, out]
  assert q.shape == w.shape and q.block == block
  error = np.abs(np.asarray(dequantize(q)) - w).reshape(128 // block, block, 24)
  d = np.abs(np.asarray(q.scale, np.float32))  # [blocks, 1, out]
  # half a step of the block's grid (nf4: half the widest gap of its 16 levels, times absmax),
  # plus what rounding d to fp16 moves the largest code (2⁻¹¹ relative, times 127 or 8 or 1)
  step = d * (np.diff(NF4).max() if format == 'nf4' else 1)
  if format == 'int4':  # Q4_0's grid is 8 steps on the extreme's side, 7 on the other: a value
    step = 2 * d        # near −extreme is up to a whole step away
  largest = {'int8': 127, 'int4': 8, 'int4_min': 15, 'nf4': 1}[format]
  assert (error <= step / 2 + d * largest * 2 ** -11 + 1e-6).all(), error.max()


def test_a_block_that_does_not_split_the_axis_is_refused_in_one_line(tmp_path):
  with pytest.raises(ValueError, match=r'base_quant_block=12: layers/self_attn/o_proj/kernel sums '
                                       r'over 8 values'):
    layout_for(TINY, 'int8', 12)
  with pytest.raises(ValueError, match=r"base_quant='int3'"):
    layout_for(TINY, 'int3')
  with pytest.raises(ValueError, match=r'is not a \.gguf file'):
    save_tiny_hf_llama(tmp_path, num_hidden_layers=1)
    aj.load_model(str(tmp_path), quant='gguf')


@pytest.fixture(scope='module')
def text_tokens(smollm2_tokenizer):
  text = ('The film is a quiet, patient study of grief, and its two leads carry it with a '
          'restraint that never turns cold. ') * 6
  return jnp.asarray([smollm2_tokenizer.encode(text)[:96]], jnp.int32)


def next_token_errors(logits, reference):
  """(‖Δ‖ / ‖reference‖ over the logits, mean KL(reference ‖ ours) in nats, top-1 agreement)."""
  ours, ref = jax.nn.log_softmax(logits[0]), jax.nn.log_softmax(reference[0])
  rms = float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference))
  kl = float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - ours), -1)))
  return rms, kl, float(jnp.mean(ours.argmax(-1) == ref.argmax(-1)))


def test_the_embedded_files_blocks_load_as_they_are_and_give_the_widened_logits(
    reference_logits, text_tokens, monkeypatch):
  """`gguf`: no Q4_1 or Q8_0 tensor is widened on the host, the blocks are the file's bytes,
  and the logits equal those of the widened base bit for bit."""
  widened = []
  dequantize_file = gguf.quants.dequantize
  monkeypatch.setattr(gguf.quants, 'dequantize',
                      lambda data, kind: widened.append(kind.name) or dequantize_file(data, kind))
  config, params = aj.load_model(SMOLLM2, quant='gguf')
  assert set(widened) <= {'F32'}, set(widened)  # the norms alone
  blocks = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
            if isinstance(x, QuantizedWeight)]
  assert len(blocks) == 8  # the embedding and the 7 projections, every layer stacked
  reader = open_gguf(aj.model.load.resolve(SMOLLM2))
  file_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name != 'F32')
  assert sum(w.nbytes for w in blocks) == file_bytes
  logits = jax.jit(Llama(config).apply)({'params': params}, text_tokens)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(reference_logits))


# the documented error of each mode on SmolLM2 (docs/quantization.md): the embedded model is
# already 4-bit (Q4_1), so int4 and nf4 round its values onto a second 4-bit grid
# (‖Δ‖/‖logits‖, KL nats, top-1 agreement) measured 0.037, 0.0006, 0.99 (int8); 0.43, 0.16, 0.88
# (int4); 0.34, 0.14, 0.93 (nf4) on the text below; the bounds leave room for another CPU's sums
BOUNDS = {'int8': (0.06, 0.002, 0.97), 'int4': (0.6, 0.3, 0.75), 'nf4': (0.5, 0.3, 0.8)}


@pytest.fixture(scope='module')
def reference_logits(smollm2, text_tokens):
  return jax.jit(Llama(smollm2[0]).apply)({'params': smollm2[1]}, text_tokens)


@pytest.mark.parametrize('mode', list(BOUNDS))
def test_smollm2s_logits_over_each_mode_are_within_the_documented_error(smollm2, reference_logits,
                                                                       text_tokens, mode):
  """The widened base quantized in memory: what `load_model(quant=mode)` does tensor by tensor
  as it reads them (tests/test_quant_methods.py runs that path)."""
  config, widened_params = smollm2
  params = quantize_params(jax.tree.map(np.asarray, widened_params), layout_for(config, mode))
  logits = jax.jit(Llama(config).apply)({'params': params}, text_tokens)
  reference = reference_logits
  rms, kl, top1 = next_token_errors(logits, reference)
  max_rms, max_kl, min_top1 = BOUNDS[mode]
  assert rms <= max_rms and kl <= max_kl and top1 >= min_top1, (rms, kl, top1)
  assert rms > 1e-3  # the blocks are in use: not the widened base by another name


def test_a_merge_into_a_base_in_blocks_is_refused_in_one_line():
  params = nn.unbox(Llama(TINY).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']
  blocked = quantize_params(params, layout_for(TINY, 'int8', 8))
  model = Llama(TINY, peft=(aj.peft.LoRA(rank=2),))
  variables = model.init_peft(jax.random.key(1), blocked)
  with pytest.raises(ValueError, match=r'stored in blocks \(base_quant\)'):
    merge(model, variables)
  saved = types.SimpleNamespace(config={'base_quant': 'int4'}, methods=model.peft)
  with pytest.raises(AdapterFileError, match=r"base_quant='int4'.*export the adapter"):
    _check_writable('merged', saved, TINY)
