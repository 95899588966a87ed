"""Named combinations: presets that train several methods together, as AdapterHub names them.

  mam      He et al.'s MAM adapter ("Towards a Unified View of Parameter-Efficient Transfer
           Learning", ICLR 2022): prefix tuning (30 tokens through an MLP of width 800) and a
           parallel adapter beside the MLP (reduction factor 2, scale 4, relu). AdapterHub's
           `MAMConfig()`: its prefix form (PrefixTuning(embedding_width='hidden',
           positions='from_zero'), peft/prefix.py) and `ParBnConfig()`.
  unipelt  Mao et al.'s UniPELT ("UniPELT: A Unified Framework for Parameter-Efficient Language
           Model Tuning", ACL 2022): gated prefix tuning (10 tokens, MLP 512), a gated Pfeiffer
           adapter (reduction factor 16) and a gated LoRA on q and v (r 8, α 2; the gate
           replaces α/r). AdapterHub's `UniPELTConfig()` with gate='token' (peft/gate.py):
           AdapterHub's gate, averaged over the whole sequence, lets every token read the
           tokens after it; a causal LM trains and decodes with each token's own gate.

Learning rates. A method trains at its class's default unless the combination sets one
(an `optimizer` entry beside its fields; the config shows it, `config.peft.prefix.optimizer`).
The papers' rates (He et al.: 5e-5 for BART-large over tens of thousands of steps; Mao et
al.: per-module rates for BERT on GLUE) are for other models and run lengths. Under Adam
every weight moves by about the learning rate a step, so a layer's output moves with its
fan-in: the prefix's MLP output (fan-in R = 800 or 512) at prefix tuning's 5e-3 moved the
keys by several units a step and the quickstart diverged (MAM's loss 8.6 → 16.6 by step 10,
accuracy 0.6376 → 0.5092; UniPELT 0.6800 → 0.5722). UniPELT's prefix trains at 3e-4 (0.8555);
MAM's prefix and its parallel adapter (reduction 2: 4.5× the `parallel` preset's width) at
1e-4, the best of the three pairs tried on the quickstart (1e-3 / 5e-4: 0.4839; 3e-4 / 2e-4:
0.6800; 1e-4 / 1e-4: 0.7890; experiments/results/README.md).
"""

from __future__ import annotations

from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning

ADAPTERHUB_PREFIX = {'embedding_width': 'hidden', 'positions': 'from_zero'}

# name -> ((method class, the fields it sets and its optimizer settings), ...), in AdapterHub's
# order of the union
COMBINATIONS = {
    'mam': ((PrefixTuning, {'num_tokens': 30, 'projection_dim': 800, **ADAPTERHUB_PREFIX,
                            'optimizer': {'learning_rate': 1e-4}}),
            (Bottleneck, {'reduction_factor': 2, 'placement': 'parallel', 'activation': 'relu',
                          'scale': 4.0, 'optimizer': {'learning_rate': 1e-4}})),
    'unipelt': ((PrefixTuning, {'num_tokens': 10, 'projection_dim': 512, **ADAPTERHUB_PREFIX,
                                'gate': 'token', 'optimizer': {'learning_rate': 3e-4}}),
                (Bottleneck, {'reduction_factor': 16, 'placement': 'pfeiffer',
                              'activation': 'relu', 'gate': 'token'}),
                (LoRA, {'rank': 8, 'alpha': 2, 'targets': ('q', 'v'), 'gate': 'token'})),
}
