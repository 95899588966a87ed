"""Hugging Face PEFT adapter files, both ways, against PEFT itself on a tiny random Llama (GQA)."""

import copy
import json
import os

import numpy as np
import peft
import pytest
import torch

import additive_jax as aj
from additive_jax.peft.files import AdapterFileError, load_adapter, save_adapter
from adapter_files_helpers import assert_same_leaves, hf_logits, our_logits, random_peft
from conftest import relative_error

ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
EXPORTS = [aj.peft.LoRA(4, 6, ALL), aj.peft.IA3(), aj.peft.PromptTuning(3), aj.peft.PrefixTuning(4),
           aj.peft.PrefixTuning(4, projection_dim=8),
           aj.peft.PTuning(3, encoder='lstm', encoder_hidden=5, encoder_layers=2)]


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(1).randint(0, 101, (2, 9))


def virtual_tokens(method):
  return method.num_virtual_tokens


@pytest.mark.parametrize('method', EXPORTS, ids=lambda m: m.call_string())
def test_export_loads_in_peft_with_our_logits_and_reads_back(tiny_hf_llama, tokens, tmp_path, method):
  hf_model, config, params = tiny_hf_llama
  peft_tree = random_peft((method,), config)
  ours = our_logits(config, params, (method,), peft_tree, tokens)
  save_adapter(str(tmp_path), (method,), peft_tree, config, format='hf_peft',
               base_model_name_or_path='tiny-random-llama')
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path)).eval()
  ref = hf_logits(peft_model, tokens, virtual_tokens(method))
  assert relative_error(ref, hf_logits(hf_model, tokens)) > 1e-2  # the adapter really acts
  assert relative_error(ours, ref) <= 1e-5

  methods, loaded = load_adapter(str(tmp_path), config)
  # PEFT holds the inference form: a prefix's MLP or P-tuning's encoder evaluated once
  method, folded = method.fold(peft_tree[method.key], config)
  peft_tree = {method.key: folded}
  assert methods == (method,)
  assert_same_leaves(loaded, peft_tree)
  np.testing.assert_array_equal(our_logits(config, params, methods, loaded, tokens),
                                our_logits(config, params, (method,), peft_tree, tokens))


PEFT_SETTINGS = {
    'lora': (peft.LoraConfig(task_type='CAUSAL_LM', r=4, lora_alpha=6,
                             target_modules=[f'{t}_proj' for t in ALL]), aj.peft.LoRA(4, 6, ALL)),
    'ia3': (peft.IA3Config(task_type='CAUSAL_LM'), aj.peft.IA3()),
    'prompt': (peft.PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=3),
               aj.peft.PromptTuning(3)),
    'prefix': (peft.PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=4),
               aj.peft.PrefixTuning(4)),
    'prefix-projection': (peft.PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=4,
                                                  prefix_projection=True, encoder_hidden_size=8),
                          aj.peft.PrefixTuning(4)),
    # PEFT saves a P-tuning adapter's encoder output alone: it reads as that fixed prompt
    'ptuning-mlp': (peft.PromptEncoderConfig(task_type='CAUSAL_LM', num_virtual_tokens=3,
                                             encoder_hidden_size=6), aj.peft.PromptTuning(3)),
    'ptuning-lstm': (peft.PromptEncoderConfig(task_type='CAUSAL_LM', num_virtual_tokens=3,
                                              encoder_reparameterization_type='LSTM',
                                              encoder_hidden_size=5), aj.peft.PromptTuning(3)),
}


def randomized_peft_model(hf_model, settings, seed=0):
  """`get_peft_model` with every trainable weight random: (IA)³ U(0.5, 1.5), the rest N(0, 0.1²)."""
  peft_model = peft.get_peft_model(copy.deepcopy(hf_model), settings).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, weight in peft_model.named_parameters():
      if weight.requires_grad:
        noise = torch.rand(weight.shape, generator=generator) if 'ia3_l' in name else torch.randn(
            weight.shape, generator=generator) * 0.1
        weight.copy_(noise + 0.5 if 'ia3_l' in name else noise)
  return peft_model


@pytest.mark.parametrize('name', PEFT_SETTINGS)
def test_peft_saved_adapter_imports_with_equal_logits(tiny_hf_llama, tokens, tmp_path, name):
  hf_model, config, params = tiny_hf_llama
  settings, expected = PEFT_SETTINGS[name]
  peft_model = randomized_peft_model(hf_model, settings)
  ref = hf_logits(peft_model, tokens, virtual_tokens(expected))
  peft_model.save_pretrained(str(tmp_path))
  methods, loaded = load_adapter(str(tmp_path), config)
  assert methods == (expected,)
  ours = our_logits(config, params, methods, loaded, tokens)
  assert relative_error(ref, hf_logits(hf_model, tokens)) > 1e-2
  assert relative_error(ours, ref) <= 1e-5


def test_pickle_is_refused_unless_allowed(tiny_hf_llama, tokens, tmp_path):
  hf_model, config, params = tiny_hf_llama
  peft_model = randomized_peft_model(hf_model, PEFT_SETTINGS['ia3'][0])
  peft_model.save_pretrained(str(tmp_path), safe_serialization=False)
  assert 'adapter_model.bin' in os.listdir(tmp_path)
  with pytest.raises(AdapterFileError, match=r'holds adapter_model.bin, a pickle, and no '
                                             r'adapter_model.safetensors.*allow_pickle=True'):
    load_adapter(str(tmp_path), config)
  methods, loaded = load_adapter(str(tmp_path), config, allow_pickle=True)
  ours = our_logits(config, params, methods, loaded, tokens)
  assert relative_error(ours, hf_logits(peft_model, tokens)) <= 1e-5


@pytest.fixture
def lora_dir(tiny_hf_llama, tmp_path):
  _, config, _ = tiny_hf_llama
  method = aj.peft.LoRA(2, 4)
  save_adapter(str(tmp_path), (method,), random_peft((method,), config), config, format='hf_peft')
  return tmp_path


def test_adapter_for_another_base_names_the_tensors(tiny_hf_llama, lora_dir):
  _, config, _ = tiny_hf_llama
  with pytest.raises(AdapterFileError) as err:
    load_adapter(str(lora_dir), config.replace(hidden_size=64))
  assert str(lora_dir / 'adapter_model.safetensors') in str(err.value)
  assert ("tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape "
          '(2, 48), this model needs (2, 64)') in str(err.value)
  with pytest.raises(AdapterFileError,
                     match=r'4 tensors missing \(.*layers\.3\.self_attn\.q_proj\.lora_A'):
    load_adapter(str(lora_dir), config.replace(num_layers=4))


@pytest.mark.parametrize('change, match', [
    ({'use_dora': True}, r'use_dora=True is not supported here'),
    ({'use_rslora': True}, r'use_rslora=True is not supported here'),
    ({'modules_to_save': ['lm_head']}, r"modules_to_save=\['lm_head'\] is not supported"),
    ({'target_modules': 'q_proj|v_proj'}, r"target_modules='q_proj\|v_proj'"),
    ({'peft_type': 'LOHA'}, r"peft_type 'LOHA' is not read here; supported: LORA, IA3"),
])
def test_unsupported_peft_settings_are_named(tiny_hf_llama, lora_dir, change, match):
  _, config, _ = tiny_hf_llama
  path = lora_dir / 'adapter_config.json'
  path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
  with pytest.raises(AdapterFileError, match=f'{path}: .*{match}'):
    load_adapter(str(lora_dir), config)


def test_prefix_for_another_head_layout_is_named(tiny_hf_llama, tmp_path):
  _, config, _ = tiny_hf_llama
  method = aj.peft.PrefixTuning(2)
  save_adapter(str(tmp_path), (method,), random_peft((method,), config), config, format='hf_peft')
  with pytest.raises(AdapterFileError, match=r'token_dim=16, this model needs 24; '
                                             r'num_attention_heads=2, this model needs 3'):
    load_adapter(str(tmp_path), config.replace(num_kv_heads=3))
