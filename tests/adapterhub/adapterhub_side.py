"""AdapterHub's side of the cross-check (see run.sh); runs in the AdapterHub venv (transformers 4.57).

    adapterhub_side.py WORK

Loads the shared base (WORK/base) as a `LlamaForCausalLM`, then
  * each of our adapters (WORK/ours/<config>) with `load_adapter(..., use_safetensors=True)`:
    every tensor must be used and none missing; its logits are kept; a fusion (a setup
    folder) as its adapters so loaded, then its fusion layer, every tensor of it checked;
    (our DiReFT's tensors go into a DiReftConfig adapter: AdapterHub's files cannot say DiReFT);
  * creates its own seq_bn, double_seq_bn, par_bn, Compacter, Compacter++, LoReFT and NoReFT
    adapters, sets every adapter weight (a Compacter's shared ones too) to random values
    (N(0, 0.3²): nothing at its init, so every term shows; ±1 on LoReFT's diagonal), keeps their
    logits and saves them with `save_adapter(..., use_safetensors=True)` to WORK/theirs/<config>;
  * fuses two of its own adapters (`add_adapter_fusion`) with random fusion weights (the value
    matrix the identity plus N(0, 0.3²)), keeps their logits and saves each with
    `save_adapter_setup(..., Fuse(...), use_safetensors=True)` to WORK/theirs/<fusion>;
  * loads SmolLM2-135M (WORK/smollm2/base) and our adapters for it (WORK/smollm2/adapters/<name>).
Every forward pass takes WORK/mask.json (a left-padded and a right-padded row). All logits go to
WORK/adapterhub_logits.safetensors ('base', 'ours/<config>', 'theirs/<config>', 'smollm2/base',
'smollm2/ours/<name>').
"""

import json
import os
import sys

import adapters
import safetensors.numpy
import safetensors.torch
import torch
import transformers

# The point of the venv: AdapterHub on the transformers it pins, not on the main environment's.
assert transformers.__version__.startswith('4.57.'), transformers.__version__
print(f'AdapterHub {adapters.__version__} on transformers {transformers.__version__}, '
      f'torch {torch.__version__}')

THEIRS = {'seq_bn': adapters.SeqBnConfig(reduction_factor=8, non_linearity='gelu'),
          'double_seq_bn': adapters.DoubleSeqBnConfig(reduction_factor=12),
          'par_bn': adapters.ParBnConfig(reduction_factor=16),
          'compacter': adapters.CompacterConfig(reduction_factor=4),
          'compacterpp': adapters.CompacterPlusPlusConfig(reduction_factor=6, phm_dim=2,
                                                          shared_phm_rule=False, phm_rank=3),
          'loreft': adapters.LoReftConfig(r=2, layers=[0, 2], prefix_positions=2,
                                          suffix_positions=1),
          'noreft': adapters.NoReftConfig(r=3, prefix_positions=1, suffix_positions=2,
                                          tied_weights=True, non_linearity='relu'),
          'lora': adapters.LoRAConfig(r=3, alpha=5, attn_matrices=['k', 'v'], output_lora=True),
          'prefix_flat': adapters.PrefixTuningConfig(prefix_length=2, flat=True),
          'mam': adapters.MAMConfig(adapters.PrefixTuningConfig(prefix_length=4, bottleneck_size=10),
                                    adapters.ParBnConfig(reduction_factor=4)),
          'unipelt': adapters.UniPELTConfig(
              adapters.PrefixTuningConfig(prefix_length=3, bottleneck_size=6),
              adapters.SeqBnConfig(reduction_factor=12), adapters.LoRAConfig(r=2, alpha=4))}
# AdapterFusion: the fused adapters' configs, and the fusion's
THEIR_FUSIONS = {
    'fusion_dynamic': ((adapters.SeqBnConfig(reduction_factor=8, non_linearity='gelu'),
                        adapters.SeqBnConfig(reduction_factor=12)),
                       adapters.AdapterFusionConfig.load('dynamic', temperature=True)),
    'fusion_houlsby_static': ((adapters.DoubleSeqBnConfig(reduction_factor=12),
                               adapters.DoubleSeqBnConfig(reduction_factor=16, non_linearity='swish')),
                              adapters.AdapterFusionConfig.load('static', residual_before=True)),
    'fusion_value_after': ((adapters.SeqBnConfig(reduction_factor=8),
                            adapters.SeqBnConfig(reduction_factor=16)),
                           adapters.AdapterFusionConfig.load('dynamic', query_before_ln=True,
                                                             value_before_softmax=False,
                                                             residual_before=True)),
}
# the modules that hold an adapter's weights, named `.{module}.{adapter name}.`
MODULES = ('adapters', 'shared_parameters', 'refts', 'loras', 'prefix_tunings', 'prefix_gates')


def logits(model, tokens, mask, name=''):
  if 'unipelt' in name:  # gated: unpadded (jax_side.UNPADDED)
    mask = torch.ones_like(mask)
  # adapters added after `.eval()` are built in training mode (AdapterHub's ReftLayer dates
  # from `adapters.init` and passes its own mode on): LoReftConfig's dropout would act
  model.eval()
  with torch.no_grad():
    return model(input_ids=tokens, attention_mask=mask).logits.numpy()


def direft_with(model, directory):
  """A DiReftConfig adapter holding the tensors of `directory` (written in NoReFT's layout:
  AdapterHub's files cannot say DiReFT, see adapterhub_reft.py); its name."""
  with open(os.path.join(directory, 'adapter_config.json'), encoding='utf-8') as f:
    settings = json.load(f)['config']
  config = adapters.DiReftConfig(r=settings['r'], layers=settings['layers'],
                                 prefix_positions=settings['prefix_positions'],
                                 suffix_positions=settings['suffix_positions'],
                                 tied_weights=settings['tied_weights'])
  model.add_adapter('direft', config=config, set_active=True)
  tensors = safetensors.numpy.load_file(os.path.join(directory, 'adapter.safetensors'))
  own = dict(model.named_parameters())
  with torch.no_grad():
    for name, value in tensors.items():
      own[name.replace('.refts.reft.', '.refts.direft.')].copy_(torch.from_numpy(value))
  if len(tensors) != len([n for n in own if '.refts.direft.' in n]):
    sys.exit(f'{directory}: {len(tensors)} tensors for the DiReFT adapter\'s parameters')
  return 'direft'


def load_ours(model, directory):
  """Loads our adapter file, refusing a missing or unused tensor; returns its name. A prefix's
  per-layer pool aliases are reported missing though they are the tensors the file holds once
  (adapterhub_prefix_lora.py)."""
  info = {}
  name = model.load_adapter(directory, use_safetensors=True, loading_info=info, set_active=True)
  missing = [k for k in info['missing_keys'] if '.prefix_tuning.pool.' not in k]
  if missing or info['unexpected_keys']:
    sys.exit(f'{directory}: missing {missing}, unexpected {info["unexpected_keys"]}')
  return name


def load_fusion(model, directory):
  """Loads our AdapterHub setup folder: each adapter by `load_ours` (every tensor checked), then
  the fusion layer, each of its tensors checked to be the model's; returns what to delete."""
  with open(os.path.join(directory, 'adapter_setup.json'), encoding='utf-8') as f:
    names = [c['children'][0] for c in json.load(f)['adapter_setup']['children']]
  for name in names:
    load_ours(model, os.path.join(directory, name))
  fusion = ','.join(names)
  model.load_adapter_fusion(os.path.join(directory, fusion), use_safetensors=True, set_active=True)
  tensors = safetensors.numpy.load_file(os.path.join(directory, fusion,
                                                     'model_adapter_fusion.safetensors'))
  own = {n: p for n, p in model.named_parameters() if f'.adapter_fusion_layer.{fusion}.' in n}
  if sorted(own) != sorted(tensors) or any(
      not torch.equal(own[n], torch.from_numpy(t)) for n, t in tensors.items()):
    sys.exit(f'{directory}: the fusion layer holds other tensors than its file')
  model.set_active_adapters(adapters.Fuse(*names))
  return names, fusion


def delete_fusion(model, names, fusion):
  model.delete_adapter_fusion(fusion)
  for name in names:
    model.delete_adapter(name)


def add_their_fusion(model, name, adapter_configs, fusion_config, generator):
  """AdapterHub's own fusion of new adapters, every weight random; (adapter names, fusion)."""
  names = [f'{name}_{n}' for n in range(len(adapter_configs))]
  for adapter_name, config in zip(names, adapter_configs):
    model.add_adapter(adapter_name, config=config)
  model.add_adapter_fusion(adapters.Fuse(*names), fusion_config, set_active=True)
  fusion = ','.join(names)
  with torch.no_grad():
    for weight_name, weight in model.named_parameters():
      if any(f'.adapters.{n}.' in weight_name for n in names) or f'.{fusion}.' in weight_name:
        weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
        if weight_name.endswith('.value.weight'):  # off the identity, not far from it
          weight.add_(torch.eye(weight.shape[0]))
  return names, fusion


def save_theirs(model, directory, name):
  """save_adapter with safetensors; a prefix adapter cannot be (its pool aliases share
  tensors: adapters loading.py:96), so its own pickle is written, read back here and rewritten
  as safetensors without the aliases."""
  try:
    model.save_adapter(directory, name, use_safetensors=True)
    return
  except RuntimeError:
    model.save_adapter(directory, name, use_safetensors=False)
  pickle = os.path.join(directory, 'pytorch_adapter.bin')
  tensors = torch.load(pickle, weights_only=True)
  safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()
                               if '.prefix_tuning.pool.' not in k},
                              os.path.join(directory, 'adapter.safetensors'))
  os.remove(pickle)


def base_model(directory):
  # eager attention: with torch's sdpa (the default), AdapterHub's prefix is masked out of a
  # padded batch (its boolean mask is inverted: adapters methods/prefix_tuning.py:611) and
  # misplaced in an unpadded one (sdpa's is_causal aligns the causal mask to the top left of
  # the n + T keys); the eager float mask is right
  model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                        attn_implementation='eager').eval()
  adapters.init(model)
  return model


def read_inputs(work):
  """(the base model, tokens, mask) that our side wrote into `work`."""
  model = base_model(os.path.join(work, 'base'))
  with open(os.path.join(work, 'tokens.json'), encoding='utf-8') as f:
    tokens = torch.tensor(json.load(f))
  with open(os.path.join(work, 'mask.json'), encoding='utf-8') as f:
    mask = torch.tensor(json.load(f))
  return model, tokens, mask


def main(work):
  model, tokens, mask = read_inputs(work)
  out = {'base': logits(model, tokens, mask)}
  for config in sorted(os.listdir(os.path.join(work, 'ours'))):
    directory = os.path.join(work, 'ours', config)
    if not os.path.isdir(directory):
      continue
    if config.startswith('fusion'):
      names, fusion = load_fusion(model, directory)
      out[f'ours/{config}'] = logits(model, tokens, mask, config)
      delete_fusion(model, names, fusion)
      continue
    name = direft_with(model, directory) if config == 'direft' else load_ours(model, directory)
    out[f'ours/{config}'] = logits(model, tokens, mask, config)
    model.delete_adapter(name)
  os.makedirs(os.path.join(work, 'theirs'))
  generator = torch.Generator().manual_seed(0)
  for name, config in THEIRS.items():
    model.add_adapter(name, config=config, set_active=True)
    with torch.no_grad():
      for weight_name, weight in model.named_parameters():
        if any(f'.{part}.{name}.' in weight_name for part in MODULES):
          weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
          if weight_name.endswith('parametrizations.weight.original'):
            # ±1 on the diagonal, as every trained file holds (torch reads it through .int())
            weight.diagonal().copy_(torch.sign(torch.randn(min(weight.shape),
                                                           generator=generator)))
    out[f'theirs/{name}'] = logits(model, tokens, mask, name)
    save_theirs(model, os.path.join(work, 'theirs', name), name)
    model.delete_adapter(name)
  for name, (adapter_configs, fusion_config) in THEIR_FUSIONS.items():
    names, fusion = add_their_fusion(model, name, adapter_configs, fusion_config, generator)
    out[f'theirs/{name}'] = logits(model, tokens, mask, name)  # its first pass: T = 50
    model.save_adapter_setup(os.path.join(work, 'theirs', name), adapters.Fuse(*names),
                             use_safetensors=True)
    delete_fusion(model, names, fusion)
  smollm2 = base_model(os.path.join(work, 'smollm2', 'base'))
  tokens = torch.tensor(safetensors.numpy.load_file(
      os.path.join(work, 'smollm2', 'logits.safetensors'))['tokens'])
  out['smollm2/base'] = logits(smollm2, tokens, mask)
  for config in sorted(os.listdir(os.path.join(work, 'smollm2', 'adapters'))):
    directory = os.path.join(work, 'smollm2', 'adapters', config)
    if config.startswith('fusion'):
      names, fusion = load_fusion(smollm2, directory)
      out[f'smollm2/ours/{config}'] = logits(smollm2, tokens, mask, config)
      delete_fusion(smollm2, names, fusion)
      continue
    name = load_ours(smollm2, directory)
    out[f'smollm2/ours/{config}'] = logits(smollm2, tokens, mask, config)
    smollm2.delete_adapter(name)
  safetensors.numpy.save_file(out, os.path.join(work, 'adapterhub_logits.safetensors'))


if __name__ == '__main__':
  main(sys.argv[1])
