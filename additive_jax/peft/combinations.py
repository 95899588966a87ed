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

Each method keeps its own optimizer settings (its class's `optimizer_defaults`): the
papers' learning rates (He et al.: 5e-5 for BART-large over tens of thousands of steps;
Mao et al.: per-module rates for BERT on GLUE) are for other models and run lengths.
"""

from __future__ import annotations

from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning

ADAPTERHUB_PREFIX = {'embedding_width': 'hidden', 'positions': 'from_zero'}

# name -> ((method class, the fields it sets), ...), in AdapterHub's order of the union
COMBINATIONS = {
    'mam': ((PrefixTuning, {'num_tokens': 30, 'projection_dim': 800, **ADAPTERHUB_PREFIX}),
            (Bottleneck, {'reduction_factor': 2, 'placement': 'parallel', 'activation': 'relu',
                          'scale': 4.0})),
    'unipelt': ((PrefixTuning, {'num_tokens': 10, 'projection_dim': 512, **ADAPTERHUB_PREFIX,
                                'gate': 'token'}),
                (Bottleneck, {'reduction_factor': 16, 'placement': 'pfeiffer',
                              'activation': 'relu', 'gate': 'token'}),
                (LoRA, {'rank': 8, 'alpha': 2, 'targets': ('q', 'v'), 'gate': 'token'})),
}
