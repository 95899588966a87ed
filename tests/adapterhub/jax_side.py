"""Our side of the AdapterHub cross-check (see run.sh); runs in the main venv.

    jax_side.py export WORK    a tiny random Llama (WORK/base), our bottleneck adapters,
                               Compacters, ReFTs, LoRA, prefix tuning, MAM, UniPELT and
                               fusions with random weights as AdapterHub files
                               (WORK/ours/<config>), our logits; SmolLM2-135M (WORK/smollm2/base)
                               with one adapter per method family (SMOLLM2) likewise, once, unless
                               WORK/smollm2 is there (the pytest test exports it from its
                               session's SmolLM2, loaded once for every test)
    jax_side.py compare WORK   AdapterHub's logits for them, and AdapterHub's own adapters
                               (WORK/theirs/<config>) read here: max relative errors, exit 1 above 1e-5
"""

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import additive_jax as aj
from additive_jax.peft.combinations import COMBINATIONS
from additive_jax.peft.registry import method_from_fields

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from adapter_files_helpers import random_peft  # noqa: E402
from conftest import TINY as CONFIG, relative_error  # noqa: E402

HUB_PREFIX = {'embedding_width': 'hidden', 'positions': 'from_zero'}  # AdapterHub's prefix form
OURS = {'seq_bn': aj.peft.Bottleneck(6, 'pfeiffer', 'gelu'),
        'double_seq_bn': aj.peft.Bottleneck(5, 'houlsby', 'silu'),
        'par_bn': aj.peft.Bottleneck(12, 'parallel', 'relu', scale=4.0),
        # CompacterConfig(reduction_factor=4); then every other PHM option once
        'compacter': aj.peft.Compacter(4),
        'compacterpp_own_rules': aj.peft.Compacter(6, shared_phm_rule=False,
                                                   factorized_phm_rule=True,
                                                   factorized_phm_W=False, phm_bias=False,
                                                   placement='pfeiffer', activation='relu'),
        'compacter_parallel_shared_w': aj.peft.Compacter(6, phm_rank=2, shared_W_phm=True,
                                                         placement='parallel', activation='silu',
                                                         scale=4.0),
        'loreft': aj.peft.ReFT(2, layers=(1,), prefix_positions=3, suffix_positions=2),
        'noreft': aj.peft.ReFT(2, prefix_positions=2, kind='noreft', activation='gelu'),
        # written in NoReFT's layout, read there into a DiReftConfig adapter (adapterhub_reft.py)
        'direft': aj.peft.ReFT(3, layers=(0, 2), prefix_positions=2, suffix_positions=1,
                               kind='direft'),
        'lora': aj.peft.LoRA(3, 6, ('q', 'k', 'v', 'up', 'down')),
        'prefix_flat': aj.peft.PrefixTuning(3, positions='from_zero'),
        # MAMConfig's and UniPELTConfig's shapes, smaller; AdapterHub's gate is 'sequence'
        'mam': (aj.peft.PrefixTuning(5, 12, **HUB_PREFIX),
                aj.peft.Bottleneck(24, 'parallel', 'relu', scale=4.0)),
        'unipelt': (aj.peft.PrefixTuning(4, 8, **HUB_PREFIX, gate='sequence'),
                    aj.peft.Bottleneck(3, 'pfeiffer', 'relu', gate='sequence'),
                    aj.peft.LoRA(4, 2, ('q', 'v'), gate='sequence')),
        # AdapterFusion: random fusion weights (the value matrix far from the identity) over
        # adapters of different widths and activations; written as AdapterHub setup folders
        'fusion_dynamic': aj.peft.Fusion(adapter_methods=("Bottleneck(dim=6, activation='gelu')",
                                                          'Bottleneck(dim=4, scale=0.5)')),
        'fusion_houlsby_static': aj.peft.Fusion(
            adapter_methods=("Bottleneck(dim=5, placement='houlsby', activation='silu')",
                             "Bottleneck(dim=3, placement='houlsby')", "Bottleneck(dim=4, "
                             "placement='houlsby')"),
            projections=('query', 'key'), residual_before=True),
        # T = 50, AdapterHub's T at a loaded fusion's first forward pass
        'fusion_temperature': aj.peft.Fusion(
            adapter_methods=('Bottleneck(dim=6)', 'Bottleneck(dim=8)'), temperature=True,
            query_before_ln=True, value_before_softmax=False)}
# what AdapterHub's adapters in adapterhub_side.py are here
THEIRS = {'seq_bn': aj.peft.Bottleneck(6, 'pfeiffer', 'gelu'),
          'double_seq_bn': aj.peft.Bottleneck(4, 'houlsby', 'silu'),
          'par_bn': aj.peft.Bottleneck(3, 'parallel', 'relu', scale=4.0),
          'compacter': aj.peft.Compacter(4),
          'compacterpp': aj.peft.Compacter(6, phm_dim=2, shared_phm_rule=False, phm_rank=3,
                                           placement='pfeiffer'),
          'loreft': aj.peft.ReFT(2, layers=(0, 2), prefix_positions=2, suffix_positions=1),
          'noreft': aj.peft.ReFT(3, prefix_positions=1, suffix_positions=2, kind='noreft',
                                 tied=True, activation='relu'),
          'lora': aj.peft.LoRA(3, 5, ('k', 'v', 'up')),
          'prefix_flat': aj.peft.PrefixTuning(2, positions='from_zero'),
          'mam': (aj.peft.PrefixTuning(4, 10, **HUB_PREFIX),
                  aj.peft.Bottleneck(12, 'parallel', 'relu', scale=4.0)),
          'unipelt': (aj.peft.PrefixTuning(3, 6, **HUB_PREFIX, gate='sequence'),
                      aj.peft.Bottleneck(4, 'pfeiffer', 'relu', gate='sequence'),
                      aj.peft.LoRA(2, 4, ('q', 'v'), gate='sequence')),
          # the folders of the fused adapters are WORK's: compared without `adapters`
          'fusion_dynamic': aj.peft.Fusion(adapter_methods=(
              "Bottleneck(dim=6, activation='gelu')", 'Bottleneck(dim=4)'), temperature=True),
          'fusion_houlsby_static': aj.peft.Fusion(
              adapter_methods=("Bottleneck(dim=4, placement='houlsby', activation='silu')",
                               "Bottleneck(dim=3, placement='houlsby', activation='silu')"),
              projections=('query', 'key'), residual_before=True, value_initialized=False,
              regularization=False),  # AdapterHub's 'static' says both
          'fusion_value_after': aj.peft.Fusion(
              adapter_methods=('Bottleneck(dim=6)', 'Bottleneck(dim=3)'), query_before_ln=True,
              value_before_softmax=False, residual_before=True)}
# on SmolLM2, once per method family beyond the bottleneck
SMOLLM2 = {'compacter': aj.peft.Compacter(**aj.peft.Compacter.presets['compacter']),
           'loreft': aj.peft.ReFT(4, layers=(3, 17, 29), prefix_positions=3, suffix_positions=2),
           'mam': tuple(method_from_fields(cls.key, fields) for cls, fields in COMBINATIONS['mam']),
           # the unipelt combination with AdapterHub's gate
           'unipelt': tuple(method_from_fields(cls.key, {**fields, 'gate': 'sequence'})
                            for cls, fields in COMBINATIONS['unipelt']),
           # AdapterFusion's default ('dynamic') over two Pfeiffer adapters
           'fusion': aj.peft.Fusion(adapter_methods=('Bottleneck(dim=8)',
                                                     "Bottleneck(dim=8, activation='gelu')"))}
# a left-padded row and a right-padded one: ReFT's positions count the real tokens
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]])
# AdapterHub's gates average over every position of the call, padding included, and no two
# implementations agree on the states at padding: a gated (UniPELT) adapter runs unpadded
UNPADDED = 'unipelt'


def mask_for(name):
  return np.ones_like(MASK) if UNPADDED in name else MASK
TOLERANCE = 1e-5  # fp32 on both sides, the same weights: rounding differences only
# MAM and UniPELT on SmolLM2 (30 layers of a prefix and two or three other modules at random
# values) are ill-conditioned: each side's fp32 logits differ from its own float64 ones by
# 1.4e-5 and 2.1e-5 (ours), 7.7e-6 and 4.1e-5 (AdapterHub), and the two sides differ by
# 1.5e-5 and 5.9e-5 in fp32; in float64 by 3.9e-6 and 1.2e-5, where the base alone differs
# by 6.6e-7. The tiny model agrees at 3e-7 for both: the formulas are the same.
TOLERANCE_SMOLLM2_UNIONS = 1e-4


def as_methods(entry) -> tuple:
  return entry if isinstance(entry, tuple) else (entry,)


def random_leaves(methods, config, seed):
  """random_peft's N(0, 0.1²) leaves; a Compacter's N(0, 0.4²), since each of its matrices is
  a product of two or three of them; a fusion's temperature at 50, where AdapterHub starts."""
  peft = random_peft(methods, config, seed)
  if 'temperature' in peft.get('fusion', {}):
    peft['fusion']['temperature'] = np.float32(50.0)
  return {key: jax.tree.map(lambda x: 4 * x, tree) if key == 'compacter' else tree
          for key, tree in peft.items()}


def logits(params, methods, peft, tokens, config=CONFIG, mask=MASK):
  """Logits at the real tokens (zero at padding, which no two implementations agree on)."""
  model = aj.Llama(config, peft=methods)
  out = model.apply({'params': params, 'peft': peft}, jnp.asarray(tokens),
                    attention_mask=jnp.asarray(mask))
  return np.asarray(out) * mask[..., None]


def unpadded_or(name, padded, unpadded):
  return unpadded if UNPADDED in name else padded


def export_base(work):
  """The tiny random base (`work/base`), its tokens and their mask, written for AdapterHub's
  side; (the base's params, the tokens)."""
  params = nn.unbox(aj.Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))['params']
  aj.peft.save_merged(os.path.join(work, 'base'), aj.Llama(CONFIG), {'params': params})
  tokens = np.random.RandomState(1).randint(0, CONFIG.vocab_size, (2, 9))
  with open(os.path.join(work, 'tokens.json'), 'w', encoding='utf-8') as f:
    json.dump(tokens.tolist(), f)
  with open(os.path.join(work, 'mask.json'), 'w', encoding='utf-8') as f:
    json.dump(MASK.tolist(), f)
  return params, tokens


def export(work):
  params, tokens = export_base(work)
  for seed, (name, entry) in enumerate(OURS.items()):
    methods = as_methods(entry)
    peft = random_leaves(methods, CONFIG, seed)
    saved = (dataclasses.replace(entry, kind='noreft'),) if name == 'direft' else methods
    aj.peft.save_adapter(os.path.join(work, 'ours', name), saved, peft, CONFIG,
                         format='adapterhub')
    safetensors.numpy.save_file({'logits': logits(params, methods, peft, tokens,
                                                  mask=mask_for(name))},
                                os.path.join(work, 'ours', f'{name}.logits.safetensors'))
  if not os.path.exists(os.path.join(work, 'smollm2')):
    export_smollm2(os.path.join(work, 'smollm2'), *aj.load_model('smollm2-135m-instruct'))


def export_smollm2(work, config, params):
  """SmolLM2-135M as an HF checkpoint, each SMOLLM2 adapter on it with random weights as an
  AdapterHub file (WORK/adapters/<name>), and our logits with and without them."""
  aj.peft.save_merged(os.path.join(work, 'base'), aj.Llama(config), {'params': params})
  tokens = np.random.RandomState(2).randint(0, config.vocab_size, (2, 9))
  out = {'tokens': tokens.astype(np.int64), 'base': logits(params, (), {}, tokens, config),
         'base_unpadded': logits(params, (), {}, tokens, config, np.ones_like(MASK))}
  for seed, (name, entry) in enumerate(SMOLLM2.items(), start=5):
    methods = as_methods(entry)
    peft = random_leaves(methods, config, seed)
    # W·h at N(0, 0.1²) would swamp SmolLM2's large hidden states (a parallel adapter's, at
    # scale 4 over 30 layers, overflows): the matrices reading the stream at 0.02 of that
    if 'reft' in peft:
      peft['reft'] = {**peft['reft'], 'source_kernel': 0.02 * peft['reft']['source_kernel']}
    if 'prefix' in peft:
      peft['prefix'] = {k: (0.02 * v if k.startswith('out_') else v) for k, v in peft['prefix'].items()}
    if 'bottleneck' in peft:
      peft['bottleneck'] = {site: {**leaves, 'down': 0.02 * leaves['down']}
                            for site, leaves in peft['bottleneck'].items()}
    if 'fusion' in peft:  # the fused adapters' down-projections and the query read the stream
      fusion = peft['fusion']
      fusion['adapters'] = {n: {site: {**leaves, 'down': 0.02 * leaves['down']}
                                for site, leaves in adapter.items()}
                            for n, adapter in fusion['adapters'].items()}
      fusion['mlp'] = {**fusion['mlp'], 'query': 0.02 * fusion['mlp']['query']}
    aj.peft.save_adapter(os.path.join(work, 'adapters', name), methods, peft, config,
                         format='adapterhub')
    out[f'ours/{name}'] = logits(params, methods, peft, tokens, config, mask_for(name))
  safetensors.numpy.save_file(out, os.path.join(work, 'logits.safetensors'))


def compare(work):
  _, params = aj.load_model(os.path.join(work, 'base'))
  with open(os.path.join(work, 'tokens.json'), encoding='utf-8') as f:
    tokens = np.asarray(json.load(f))
  theirs = {name: value * mask_for(name)[..., None] for name, value in safetensors.numpy.load_file(
      os.path.join(work, 'adapterhub_logits.safetensors')).items()}
  base = logits(params, (), {}, tokens)
  base_unpadded = logits(params, (), {}, tokens, mask=np.ones_like(MASK))
  rows = [('base model', relative_error(base, theirs['base']), None)]
  for name in OURS:
    ours = safetensors.numpy.load_file(os.path.join(work, 'ours', f'{name}.logits.safetensors'))
    rows.append((f'ours -> AdapterHub {name}', relative_error(ours['logits'], theirs[f'ours/{name}']),
                 relative_error(theirs[f'ours/{name}'], unpadded_or(name, base, base_unpadded))))
  for name, expected in THEIRS.items():
    methods, peft = aj.peft.load_adapter(os.path.join(work, 'theirs', name), CONFIG)
    if name.startswith('fusion'):  # its adapters' folders are WORK's
      methods = tuple(dataclasses.replace(m, adapters=()) for m in methods)
    if methods != as_methods(expected):
      sys.exit(f'AdapterHub {name} read as {", ".join(m.call_string() for m in methods)}, '
               f'expected {", ".join(m.call_string() for m in as_methods(expected))}')
    ours = logits(params, methods, peft, tokens, mask=mask_for(name))
    rows.append((f'AdapterHub {name} -> ours', relative_error(ours, theirs[f'theirs/{name}']),
                 relative_error(theirs[f'theirs/{name}'], unpadded_or(name, base, base_unpadded))))
  ours = safetensors.numpy.load_file(os.path.join(work, 'smollm2', 'logits.safetensors'))
  rows.append(('SmolLM2-135M base model', relative_error(ours['base'], theirs['smollm2/base']), None))
  for name in SMOLLM2:
    rows.append((f'ours -> AdapterHub, SmolLM2 {name}', relative_error(
        ours[f'ours/{name}'], theirs[f'smollm2/ours/{name}']), relative_error(
            theirs[f'smollm2/ours/{name}'], unpadded_or(name, ours['base'],
                                                        ours['base_unpadded']))))
  for label, error, effect in rows:
    effect_text = '' if effect is None else f'   (adapter changes the logits by {effect:.2f})'
    print(f'{label:<46} max relative error {error:.1e}{effect_text}')
  failed = [label for label, error, effect in rows
            if error > (TOLERANCE_SMOLLM2_UNIONS if label.endswith(('SmolLM2 mam', 'SmolLM2 unipelt'))
                        else TOLERANCE) or (effect is not None and effect < 1e-2)]
  if failed:
    sys.exit(f'failed: {", ".join(failed)}')


if __name__ == '__main__':
  {'export': export, 'compare': compare}[sys.argv[1]](sys.argv[2])
