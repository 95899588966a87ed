"""AdapterHub's side of the cross-check (see run.sh); runs in the AdapterHub venv (transformers 4.57).

    adapterhub_side.py WORK

Loads the shared base (WORK/base) as a `LlamaForCausalLM`, then
  * each of our adapters (WORK/ours/<config>) with `load_adapter(..., use_safetensors=True)`:
    every tensor must be used and none missing; its logits are kept;
  * creates its own seq_bn, double_seq_bn and par_bn adapters, sets every adapter weight to
    random values (N(0, 0.3²): nothing at its init, so every term shows), keeps their logits and
    saves them with `save_adapter(..., use_safetensors=True)` to WORK/theirs/<config>.
All logits go to WORK/adapterhub_logits.safetensors ('base', 'ours/<config>', 'theirs/<config>').
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
          'loreft': adapters.LoReftConfig(r=2, layers=[0, 2], prefix_positions=2,
                                          suffix_positions=1),
          'noreft': adapters.NoReftConfig(r=3, prefix_positions=1, suffix_positions=2,
                                          tied_weights=True, non_linearity='relu')}


def logits(model, tokens, mask):
  # adapters added after `.eval()` are built in training mode (AdapterHub's ReftLayer dates
  # from `adapters.init` and passes its own mode on): LoReftConfig's dropout would act
  model.eval()
  with torch.no_grad():
    return model(input_ids=tokens, attention_mask=mask).logits.numpy()


def direft_with(model, directory, settings):
  """A DiReftConfig adapter holding the tensors of `directory` (written in NoReFT's layout:
  AdapterHub's files cannot say DiReFT, see adapterhub_reft.py); its name."""
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


def main(work):
  model = transformers.LlamaForCausalLM.from_pretrained(os.path.join(work, 'base'),
                                                        dtype=torch.float32).eval()
  adapters.init(model)
  with open(os.path.join(work, 'tokens.json'), encoding='utf-8') as f:
    tokens = torch.tensor(json.load(f))
  with open(os.path.join(work, 'mask.json'), encoding='utf-8') as f:
    mask = torch.tensor(json.load(f))
  out = {'base': logits(model, tokens, mask)}
  for config in sorted(os.listdir(os.path.join(work, 'ours'))):
    directory = os.path.join(work, 'ours', config)
    if not os.path.isdir(directory):
      continue
    info = {}
    if config.startswith('direft'):
      with open(os.path.join(directory, 'adapter_config.json'), encoding='utf-8') as f:
        name = direft_with(model, directory, json.load(f)['config'])
    else:
      name = model.load_adapter(directory, use_safetensors=True, loading_info=info, set_active=True)
    if info.get('missing_keys') or info.get('unexpected_keys'):
      sys.exit(f'{directory}: missing {info["missing_keys"]}, unexpected {info["unexpected_keys"]}')
    out[f'ours/{config}'] = logits(model, tokens, mask)
    model.delete_adapter(name)
  os.makedirs(os.path.join(work, 'theirs'))
  generator = torch.Generator().manual_seed(0)
  with open(os.path.join(work, 'which.json'), encoding='utf-8') as f:
    wanted = json.load(f)['theirs']
  for name, config in THEIRS.items():
    if name not in wanted:
      continue
    model.add_adapter(name, config=config, set_active=True)
    with torch.no_grad():
      for weight_name, weight in model.named_parameters():
        if f'.adapters.{name}.' in weight_name or f'.refts.{name}.' in weight_name:
          weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
          if weight_name.endswith('parametrizations.weight.original'):
            # ±1 on the diagonal, as every trained file holds (torch reads it through .int())
            weight.diagonal().copy_(torch.sign(torch.randn(min(weight.shape),
                                                           generator=generator)))
    out[f'theirs/{name}'] = logits(model, tokens, mask)
    model.save_adapter(os.path.join(work, 'theirs', name), name, use_safetensors=True)
    model.delete_adapter(name)
  safetensors.numpy.save_file(out, os.path.join(work, 'adapterhub_logits.safetensors'))


if __name__ == '__main__':
  main(sys.argv[1])
