"""AdapterHub's side of the cross-check (see run.sh); runs in the AdapterHub venv (transformers 4.57).

    adapterhub_side.py WORK

Loads the shared base (WORK/base) as a `LlamaForCausalLM`, then
  * each of our adapters (WORK/ours/<config>) with `load_adapter(..., use_safetensors=True)`:
    every tensor must be used and none missing; its logits are kept;
  * creates its own seq_bn, double_seq_bn, par_bn, Compacter and Compacter++ adapters, sets
    every adapter weight (a Compacter's shared ones too) to random values (N(0, 0.3²): nothing
    at its init, so every term shows), keeps their logits and saves them with
    `save_adapter(..., use_safetensors=True)` to WORK/theirs/<config>;
  * loads SmolLM2-135M (WORK/smollm2/base) and our Compacter for it (WORK/smollm2/adapter).
All logits go to WORK/adapterhub_logits.safetensors ('base', 'ours/<config>', 'theirs/<config>',
'smollm2/base', 'smollm2/ours').
"""

import json
import os
import sys

import adapters
import safetensors.numpy
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
                                                          shared_phm_rule=False, phm_rank=3)}


def logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=tokens).logits.numpy()


def load_ours(model, directory):
  """Loads our adapter file, refusing a missing or unused tensor; returns its name."""
  info = {}
  name = model.load_adapter(directory, use_safetensors=True, loading_info=info, set_active=True)
  if info['missing_keys'] or info['unexpected_keys']:
    sys.exit(f'{directory}: missing {info["missing_keys"]}, unexpected {info["unexpected_keys"]}')
  return name


def base_model(directory):
  model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  adapters.init(model)
  return model


def main(work):
  model = base_model(os.path.join(work, 'base'))
  with open(os.path.join(work, 'tokens.json'), encoding='utf-8') as f:
    tokens = torch.tensor(json.load(f))
  out = {'base': logits(model, tokens)}
  for config in sorted(os.listdir(os.path.join(work, 'ours'))):
    directory = os.path.join(work, 'ours', config)
    if not os.path.isdir(directory):
      continue
    name = load_ours(model, directory)
    out[f'ours/{config}'] = logits(model, tokens)
    model.delete_adapter(name)
  os.makedirs(os.path.join(work, 'theirs'))
  generator = torch.Generator().manual_seed(0)
  for name, config in THEIRS.items():
    model.add_adapter(name, config=config, set_active=True)
    with torch.no_grad():
      for weight_name, weight in model.named_parameters():
        if f'.adapters.{name}.' in weight_name or f'.shared_parameters.{name}.' in weight_name:
          weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
    out[f'theirs/{name}'] = logits(model, tokens)
    model.save_adapter(os.path.join(work, 'theirs', name), name, use_safetensors=True)
    model.delete_adapter(name)
  smollm2 = base_model(os.path.join(work, 'smollm2', 'base'))
  tokens = torch.tensor(safetensors.numpy.load_file(
      os.path.join(work, 'smollm2', 'logits.safetensors'))['tokens'])
  out['smollm2/base'] = logits(smollm2, tokens)
  load_ours(smollm2, os.path.join(work, 'smollm2', 'adapter'))
  out['smollm2/ours'] = logits(smollm2, tokens)
  safetensors.numpy.save_file(out, os.path.join(work, 'adapterhub_logits.safetensors'))


if __name__ == '__main__':
  main(sys.argv[1])
