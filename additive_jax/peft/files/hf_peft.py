"""Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`.

One method per directory, as PEFT holds it, for `LlamaForCausalLM`
(`PeftModel.from_pretrained(model, directory)` reads what `save` writes, and
`load` reads what PEFT's `save_pretrained` writes). PEFT's names and shapes:

  LoRA    base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight [r, I] = a[l]ᵀ
          ...q_proj.lora_B.weight [O, r] = b[l]ᵀ   (mlp.gate_proj, ... for the MLP targets)
  (IA)³   ...layers.{l}.self_attn.k_proj.ia3_l [K·H, 1] = l_k[l], ...v_proj.ia3_l [K·H, 1],
          ...mlp.down_proj.ia3_l [1, F] = l_ff[l]
  prompt  prompt_embeddings [n, D] = prompt_PD
  P-tuning  prompt_embeddings [n, D] = the prompt encoder's output f(E)
  prefix  prompt_embeddings [n, L·2·K·H], which PEFT views as [n, L·2, K, H]: layer l's
          keys at 2l, its values at 2l + 1 (GQA-aware: token_dim = K·H, num_attention_heads = K)
  adaption prompt (LLaMA-Adapter), in each of the top `adapter_layers` layers l:
          ...layers.{l}.self_attn.adaption_prompt [1, n, D], ...self_attn.adaption_gate [1]

A prefix trained with a reparameterization MLP is written folded
(`PrefixTuning.fold`), as PEFT saves one itself, and reads back as a plain
`PrefixTuning(n)`. A prompt is written with `prompt_tuning_init: RANDOM`: the
init only matters before training, and PEFT's TEXT init would load a tokenizer
on reading; it reads back as `PromptTuning(n)`.

P-tuning is written in its inference form, as PEFT saves it (`get_peft_model_state_dict`
keeps only the encoder's output, never the embedding E or the encoder's weights), with
`peft_type: P_TUNING` and the encoder's settings for a reader. `PeftModel.from_pretrained`
(inference mode, its default) builds no encoder and uses the saved vectors as the prompt;
with `is_trainable=True` it would run a freshly initialized encoder over them instead. A
PEFT P-tuning file reads back as the fixed prompt it holds: `PromptTuning(n)`.

Reading refuses, by name, the PEFT settings our methods do not compute (DoRA,
rsLoRA, per-layer ranks, trained biases, `modules_to_save`, other targets, ...)
rather than load an adapter that would give other logits.
"""

from __future__ import annotations

import os

import numpy as np

from additive_jax.peft.adaption_prompt import AdaptionPrompt
from additive_jax.peft.files.file_io import (AdapterFileError, check_shapes, join_problems,
                                             read_json, read_tensors, write_json, write_tensors)
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.lora import TARGETS, LoRA, widths
from additive_jax.peft.prefix import PrefixTuning
from additive_jax.peft.prompt import PromptTuning
from additive_jax.peft.ptuning import PTuning

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
PICKLE_NAME = 'adapter_model.bin'
LAYER = 'base_model.model.model.layers.{}.'
IA3_MODULES = {'l_k': 'self_attn.k_proj', 'l_v': 'self_attn.v_proj', 'l_ff': 'mlp.down_proj'}
NOT_SET = (None, False, [], {}, 'none')  # how PEFT writes a setting that is off


def _module(target: str) -> str:
  return '.'.join(TARGETS[target][1:])  # ('layers', 'self_attn', 'q_proj') -> self_attn.q_proj


def _module_names(value) -> bool:
  """Whether a setting is a list of module names (a nested list is not: it cannot be hashed)."""
  return isinstance(value, list) and all(isinstance(name, str) for name in value)


def _lora_names(target: str, layer: int) -> tuple[str, str]:
  prefix = LAYER.format(layer) + _module(target)
  return prefix + '.lora_A.weight', prefix + '.lora_B.weight'


def _export_lora(method: LoRA, tree, config):
  tensors = {}
  for target in method.targets:
    for layer in range(config.num_layers):
      a_name, b_name = _lora_names(target, layer)
      tensors[a_name] = np.asarray(tree[target]['a'][layer]).T
      tensors[b_name] = np.asarray(tree[target]['b'][layer]).T
  return tensors, {'peft_type': 'LORA', 'r': method.rank, 'lora_alpha': method.alpha,
                   'target_modules': [f'{t}_proj' for t in method.targets], 'lora_dropout': 0.0,
                   'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False,
                   'use_dora': False, 'init_lora_weights': True}


def _import_lora(settings, tensors, config, path, weights_path):
  _refuse_set(settings, path, 'use_dora', 'use_rslora', 'bias', 'lora_bias', 'rank_pattern',
              'alpha_pattern', 'layers_to_transform', 'layer_replication', 'modules_to_save',
              'target_parameters', 'trainable_token_indices', 'fan_in_fan_out')
  modules = settings.get('target_modules')
  names = {f'{t}_proj': t for t in TARGETS}
  if not (_module_names(modules) and modules and all(m in names for m in modules)):
    raise AdapterFileError(f'{path}: target_modules={modules!r}; LoRA here targets a list of '
                           f'{", ".join(names)}')
  # PEFT saves the targets as an unordered set; LoRA's result does not depend on their order
  targets = tuple(t for name, t in names.items() if name in modules)
  method = _construct(path, LoRA, rank=settings.get('r'), alpha=settings.get('lora_alpha'),
                      targets=targets)
  expected = {}
  for target in method.targets:
    fan_in, fan_out = widths(config, target)
    for layer in range(config.num_layers):
      a_name, b_name = _lora_names(target, layer)
      expected[a_name], expected[b_name] = (method.rank, fan_in), (fan_out, method.rank)
  check_shapes(expected, tensors, weights_path)
  tree = {}
  for target in method.targets:
    a_names, b_names = zip(*(_lora_names(target, l) for l in range(config.num_layers)))
    tree[target] = {'a': np.stack([tensors[name].T for name in a_names]),
                    'b': np.stack([tensors[name].T for name in b_names])}
  return method, tree


def _ia3_name(leaf: str, layer: int) -> str:
  return LAYER.format(layer) + IA3_MODULES[leaf] + '.ia3_l'


def _export_ia3(method: IA3, tree, config):
  tensors = {}
  for layer in range(config.num_layers):
    tensors[_ia3_name('l_k', layer)] = np.asarray(tree['l_k'][layer])[:, None]
    tensors[_ia3_name('l_v', layer)] = np.asarray(tree['l_v'][layer])[:, None]
    tensors[_ia3_name('l_ff', layer)] = np.asarray(tree['l_ff'][layer])[None, :]
  return tensors, {'peft_type': 'IA3', 'target_modules': ['k_proj', 'v_proj', 'down_proj'],
                   'feedforward_modules': ['down_proj'], 'fan_in_fan_out': False,
                   'init_ia3_weights': True}


def _import_ia3(settings, tensors, config, path, weights_path):
  _refuse_set(settings, path, 'modules_to_save', 'fan_in_fan_out', 'layers_to_transform')
  targets, feedforward = settings.get('target_modules'), settings.get('feedforward_modules')
  if (not _module_names(targets) or set(targets) != {'k_proj', 'v_proj', 'down_proj'} or
      not _module_names(feedforward) or set(feedforward) != {'down_proj'}):
    raise AdapterFileError(f'{path}: target_modules={targets!r}, feedforward_modules={feedforward!r}; '
                           "(IA)³ here scales exactly k_proj and v_proj (outputs) and down_proj "
                           "(input): ['k_proj', 'v_proj', 'down_proj'] with ['down_proj']")
  kv, f = config.num_kv_heads * config.head_dim, config.intermediate_size
  expected = {}
  for layer in range(config.num_layers):
    expected.update({_ia3_name('l_k', layer): (kv, 1), _ia3_name('l_v', layer): (kv, 1),
                     _ia3_name('l_ff', layer): (1, f)})
  check_shapes(expected, tensors, weights_path)
  tree = {leaf: np.stack([tensors[_ia3_name(leaf, l)].reshape(-1) for l in range(config.num_layers)])
          for leaf in IA3_MODULES}
  return IA3(), tree


def _virtual_token_settings(peft_type, num_tokens, token_dim, heads, config):
  return {'peft_type': peft_type, 'num_virtual_tokens': num_tokens, 'token_dim': token_dim,
          'num_transformer_submodules': 1, 'num_attention_heads': heads,
          'num_layers': config.num_layers}


def _export_prompt(method: PromptTuning, tree, config):
  settings = _virtual_token_settings('PROMPT_TUNING', method.num_tokens, config.hidden_size,
                                     config.num_heads, config)
  return {'prompt_embeddings': np.asarray(tree['prompt_PD'])}, {**settings,
                                                                'prompt_tuning_init': 'RANDOM'}


def _export_ptuning(method: PTuning, tree, config):
  folded, prompt = method.fold(tree, config)
  tensors, settings = _export_prompt(folded, prompt, config)
  settings = {**settings, 'peft_type': 'P_TUNING',
              'encoder_reparameterization_type': method.encoder.upper(),
              'encoder_hidden_size': method.width(config),
              'encoder_num_layers': method.encoder_layers, 'encoder_dropout': 0.0}
  del settings['prompt_tuning_init']
  return tensors, settings


def _import_prompt(settings, tensors, config, path, weights_path):
  _check_virtual_tokens(settings, path, {'token_dim': config.hidden_size})
  method = _construct(path, PromptTuning, settings.get('num_virtual_tokens'))
  check_shapes({'prompt_embeddings': (method.num_tokens, config.hidden_size)}, tensors, weights_path)
  return method, {'prompt_PD': tensors['prompt_embeddings']}


def _export_prefix(method: PrefixTuning, tree, config):
  if method.projection_dim is not None:
    method, tree = method.fold(tree, config)
  kv_L2PKH = np.stack([np.asarray(tree['k_LPKH']), np.asarray(tree['v_LPKH'])], axis=1)
  flat = kv_L2PKH.transpose(2, 0, 1, 3, 4).reshape(method.num_tokens, -1)  # [n, L·2·K·H]
  kv = config.num_kv_heads * config.head_dim
  settings = _virtual_token_settings('PREFIX_TUNING', method.num_tokens, kv, config.num_kv_heads,
                                     config)
  return {'prompt_embeddings': flat}, {**settings, 'prefix_projection': False,
                                       'encoder_hidden_size': kv}


def _import_prefix(settings, tensors, config, path, weights_path):
  layers, k, h = config.num_layers, config.num_kv_heads, config.head_dim
  _check_virtual_tokens(settings, path, {'token_dim': k * h, 'num_attention_heads': k,
                                         'num_layers': layers})
  method = _construct(path, PrefixTuning, settings.get('num_virtual_tokens'))
  n = method.num_tokens
  check_shapes({'prompt_embeddings': (n, layers * 2 * k * h)}, tensors, weights_path)
  kv_L2PKH = tensors['prompt_embeddings'].reshape(n, layers, 2, k, h).transpose(1, 2, 0, 3, 4)
  return method, {'k_LPKH': kv_L2PKH[:, 0], 'v_LPKH': kv_L2PKH[:, 1]}


def _adaption_names(layer: int) -> tuple[str, str]:
  prefix = LAYER.format(layer) + 'self_attn.'
  return prefix + 'adaption_prompt', prefix + 'adaption_gate'


def _export_adaption_prompt(method: AdaptionPrompt, tree, config):
  tensors, first = {}, config.num_layers - method.num_layers
  for index in range(method.num_layers):
    prompt_name, gate_name = _adaption_names(first + index)
    tensors[prompt_name] = np.asarray(tree['prompt_LPD'][index])[None]
    tensors[gate_name] = np.asarray(tree['gate_L'][index]).reshape(1)
  return tensors, {'peft_type': 'ADAPTION_PROMPT', 'adapter_len': method.num_tokens,
                   'adapter_layers': method.num_layers, 'target_modules': 'self_attn'}


def _import_adaption_prompt(settings, tensors, config, path, weights_path):
  _refuse_set(settings, path, 'modules_to_save')
  if settings.get('target_modules') not in (None, 'self_attn'):
    raise AdapterFileError(f"{path}: target_modules={settings['target_modules']!r}; an adaption "
                           "prompt here wraps a Llama's 'self_attn'")
  method = _construct(path, AdaptionPrompt, settings.get('adapter_len'),
                      settings.get('adapter_layers'))
  try:
    method.check(config)
  except ValueError as err:
    raise AdapterFileError(f'{path}: {err}') from None
  names = [_adaption_names(l) for l in range(config.num_layers - method.num_layers,
                                             config.num_layers)]
  expected = {}
  for prompt, gate in names:
    expected[prompt], expected[gate] = (1, method.num_tokens, config.hidden_size), (1,)
  check_shapes(expected, tensors, weights_path)
  return method, {'prompt_LPD': np.stack([tensors[prompt][0] for prompt, _ in names]),
                  'gate_L': np.concatenate([tensors[gate] for _, gate in names])}


EXPORTERS = {'lora': _export_lora, 'ia3': _export_ia3, 'prompt': _export_prompt,
             'ptuning': _export_ptuning, 'prefix': _export_prefix,
             'adaption_prompt': _export_adaption_prompt}
# a P-tuning file holds the encoder's output alone: the prompt that PEFT reads it as
IMPORTERS = {'LORA': _import_lora, 'IA3': _import_ia3, 'PROMPT_TUNING': _import_prompt,
             'P_TUNING': _import_prompt, 'PREFIX_TUNING': _import_prefix,
             'ADAPTION_PROMPT': _import_adaption_prompt}


def _refuse_set(settings, path, *names):
  """Refuses a PEFT setting that is on: our methods compute only PEFT's plain variant."""
  on = [f'{name}={settings[name]!r}' for name in names if settings.get(name) not in NOT_SET]
  if on:
    raise AdapterFileError(f'{path}: {", ".join(on)} is not supported here (the methods compute '
                           "PEFT's plain variant); retrain without it or read it with PEFT")


def _check_virtual_tokens(settings, path, facts):
  """Prompt and prefix tuning: a causal LM's single stack, and the base's widths."""
  _refuse_set(settings, path, 'modules_to_save')
  problems = [f'task_type={settings.get("task_type")!r} (needs CAUSAL_LM)'
              ] if settings.get('task_type') != 'CAUSAL_LM' else []
  if settings.get('num_transformer_submodules', 1) != 1:
    problems.append(f'num_transformer_submodules={settings["num_transformer_submodules"]!r} '
                    '(needs 1, a decoder-only model)')
  problems += [f'{name}={settings.get(name)!r}, this model needs {value}'
               for name, value in facts.items() if settings.get(name) != value]
  if problems:
    raise AdapterFileError(f'{path}: {join_problems(problems)}')


def _construct(path, cls, *args, **kwargs):
  try:
    return cls(*args, **kwargs)
  except (ValueError, TypeError) as err:
    raise AdapterFileError(f'{path}: {err}') from None


def save(directory, method, tree, config, base_model_name_or_path=None) -> None:
  exporter = EXPORTERS.get(method.key)
  if exporter is None:
    raise AdapterFileError(f'{method.call_string()} has no Hugging Face PEFT equivalent (PEFT files '
                           'hold LoRA, (IA)³, prompt tuning, P-tuning, prefix tuning or '
                           'adaption prompts); use '
                           'format="aj"' + (' or "adapterhub"' if method.key == 'bottleneck' else ''))
  tensors, settings = exporter(method, tree, config)
  write_tensors(os.path.join(directory, WEIGHTS_NAME),
                {name: np.asarray(t, np.float32) for name, t in tensors.items()}, {'format': 'pt'})
  write_json(os.path.join(directory, CONFIG_NAME),
             {'base_model_name_or_path': base_model_name_or_path, 'task_type': 'CAUSAL_LM',
              'inference_mode': True, **settings})


def load(directory, config, allow_pickle=False):
  """(method, tree) from a PEFT adapter directory, checked against the base `config`."""
  path = os.path.join(directory, CONFIG_NAME)
  settings = read_json(path)
  peft_type = settings.get('peft_type')
  importer = IMPORTERS.get(peft_type) if isinstance(peft_type, str) else None  # a list: unhashable
  if importer is None:
    raise AdapterFileError(f'{path}: peft_type {settings.get("peft_type")!r} is not read here; '
                           f'supported: {", ".join(IMPORTERS)}')
  tensors, weights_path = read_tensors(directory, WEIGHTS_NAME, PICKLE_NAME, allow_pickle)
  return importer(settings, tensors, config, path, weights_path)
