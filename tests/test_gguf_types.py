"""GGUF files of the float and classic block-quantized types, made from a tiny random HF Llama.

Each file is written the way llama.cpp's `convert_hf_to_gguf.py` writes one: the llama
metadata, gguf-py's own tensor names, the q/k rows permuted, each tensor quantized by
`gguf.quants.quantize` (the norms too, which llama.cpp keeps in F32: one more tensor kind
to check). Our loader must give back exactly the HF weights after that type's
quantize -> dequantize round trip, and logits equal to transformers' on those weights.
"""

import copy

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize, quantize

import additive_jax as aj
from additive_jax.model.convert import params_to_hf
from adapter_files_helpers import hf_logits, our_logits
from conftest import relative_error, save_tiny_hf_llama

QUANT = gguf.GGMLQuantizationType
# Rows of 64 and 128 elements: whole 32-element blocks for the Q types.
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=2)
# Relative error of the logits against the fp32 model's, about twice the measured value
# (in brackets). A weight moves by up to half a quantization step: 2^-11 of itself in F16,
# 2^-8 in BF16; of its 32-block's largest magnitude, 1/254 in Q8_0, 1/31 in Q5_1 and 1/15
# in Q4_1 (32 or 16 levels between the block's min and max), 1/16 in Q5_0 and 1/8 in Q4_0
# (32 or 16 levels scaled to the largest value, the other end one step short). Measured
# worst weights, in that order: 4.3e-4, 3.5e-3, 4.1e-3, 0.030, 0.064, 0.061, 0.122. Two
# layers carry that into the logits at 1-2.5 times the weights' relative error.
LOGIT_BOUNDS = {QUANT.F32: 1e-5,   # [3.3e-7]
                QUANT.F16: 1e-3,   # [4.8e-4]
                QUANT.BF16: 1e-2,  # [3.2e-3]
                QUANT.Q8_0: 2e-2,  # [9.2e-3]
                QUANT.Q5_1: 0.15,  # [0.071]
                QUANT.Q5_0: 0.15,  # [0.079]
                QUANT.Q4_1: 0.3,   # [0.146]
                QUANT.Q4_0: 0.3}   # [0.159]


def permute(w, heads):
  """llama.cpp's q/k row permutation (`LlamaModel.permute` in convert_hf_to_gguf.py)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def round_trip(w, qtype):
  return dequantize(quantize(w, qtype), qtype).reshape(w.shape)


def write_gguf(path, hf_model, qtype):
  config = hf_model.config
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_vocab_size(config.vocab_size)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_rope_freq_base(config.rope_parameters['rope_theta'])
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
  for name, tensor in hf_model.state_dict().items():
    w = tensor.numpy()
    if name.endswith('q_proj.weight'):
      w = permute(w, config.num_attention_heads)
    elif name.endswith('k_proj.weight'):
      w = permute(w, config.num_key_value_heads)
    writer.add_tensor(names.get_name(name, try_suffixes=('.weight',)), quantize(w, qtype),
                      raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(directory, HF model, tokens, its fp32 logits)."""
  directory = tmp_path_factory.mktemp('tiny_gguf')
  hf_model = save_tiny_hf_llama(directory / 'hf', **SIZES)
  tokens = np.random.RandomState(0).randint(0, SIZES['vocab_size'], (2, 16))
  return directory, hf_model, tokens, hf_logits(hf_model, tokens)


def test_f32_logits_match_transformers(tiny):
  directory, hf_model, tokens, reference = tiny
  write_gguf(directory / 'f32.gguf', hf_model, QUANT.F32)
  ours = our_logits(*aj.load_model(str(directory / 'f32.gguf')), (), {}, tokens)
  assert relative_error(ours, reference) <= 1e-5
  # transformers' own GGUF reader, on the same file
  theirs = transformers.LlamaForCausalLM.from_pretrained(
      directory, gguf_file='f32.gguf', dtype=torch.float32).eval()
  assert relative_error(ours, hf_logits(theirs, tokens)) <= 1e-5


@pytest.mark.parametrize('qtype', list(LOGIT_BOUNDS), ids=lambda q: q.name)
def test_each_type_gives_the_round_tripped_hf_weights(tiny, qtype):
  directory, hf_model, tokens, reference = tiny
  path = directory / f'{qtype.name}.gguf'
  write_gguf(path, hf_model, qtype)
  config, params = aj.load_model(str(path))

  # The round trip is row-wise, so it commutes with the row permutation: exact equality
  # checks the names, the un-permutation, the transposes and the dequantization at once.
  expected = {name: round_trip(t.numpy(), qtype) for name, t in hf_model.state_dict().items()}
  ours = params_to_hf(config, params)
  assert ours.keys() == expected.keys()
  for name, weight in expected.items():
    np.testing.assert_array_equal(ours[name], weight, err_msg=name)

  quantized_model = copy.deepcopy(hf_model)
  quantized_model.load_state_dict({name: torch.from_numpy(w) for name, w in expected.items()})
  logits = our_logits(config, params, (), {}, tokens)
  assert relative_error(logits, hf_logits(quantized_model, tokens)) <= 1e-5
  assert relative_error(logits, reference) <= LOGIT_BOUNDS[qtype]
