"""LLaMA-Adapter (adaption prompts): in the top layers, a learned prompt the queries attend to
through a zero-initialized gate.

In each of the last `num_layers` layers l, n free vectors P_l [n, D] are projected by the
layer's own k_proj and v_proj (no rotary: they have no position), the layer's rotated
queries attend to them with a softmax of their own, and the result, scaled by a learned
scalar gate g_l, is added to the attention's output heads before o_proj:

    a_l(x) = attn_l(x) + g_l · softmax(q(x) k(P_l)ᵀ / √H) v(P_l)      (per query head)
    out_l  = o_proj(a_l(x))

o_proj is linear, so adding before it is PEFT's o_proj(attn) + o_proj(adapter) up to
rounding (without o_proj's bias a second time: see below). Every query sees every adapter
key: padding, packed segments and the causal mask do not apply to them (PEFT ignores
`attention_mask` for them too), and with a KV cache the adapter keys are not cached; every
decoding step attends to them.

Parameters: num_layers · (n·D + 1) (SmolLM2-135M, the preset: 28 · (10·576 + 1) = 161,308).

Initialization, as PEFT's and the paper's official code: P ~ N(0, 1), g = 0, so the model
starts as the base exactly ("zero-init attention").

Numerics, as PEFT's `AdaptedAttention.forward` (peft 0.21.2, tuners/adaption_prompt/layer.py):
scores in the compute dtype scaled by 1/√H, the softmax in fp32 cast back to the compute
dtype, then multiplied by the gate. k_proj and v_proj apply with their biases (PEFT calls the
modules), and so do the other methods' `project` hooks on k and v: the prompt is projected as
a token's input is, so merging a LoRA or (IA)³ on k/v into the base (`aj.peft.merge`) leaves
the logits unchanged.

Grouped-query attention: query head n reads kv head n // (N/K). PEFT computes the group size
as `k_proj.in_features // k_proj.out_features` = D // (K·H) (layer.py:171, utils.py:74),
which equals N/K only when H = D/N. For a model whose head_dim is set apart from D/N
(`head_dim` in its config) PEFT's forward fails with a shape error (its `view` to
N // factor heads, or the scores of N/factor·factor ≠ N heads), so no PEFT adapter runs on
it; this class computes N/K there (tested against PEFT with the factor corrected).

An attention bias (attention_bias=True; Llama checkpoints have none): PEFT's
`o_proj(adapter_output)` (layer.py:216) adds o_proj's bias a second time, also at a zero
gate, so its adapter is not the identity at init. Here it is added once, and the zero gate
is the base model exactly.

Leaves (fp32): {'prompt_LPD': [num_layers, n, D], 'gate_L': [num_layers]}, the first entry
for layer L − num_layers.

Zhang, Han, Liu, Zhou, Lu, Gao, Li & Qiao, "LLaMA-Adapter: Efficient Fine-tuning of Language
Models with Zero-init Attention", ICLR 2024 (arXiv 2303.16199). HF PEFT:
`AdaptionPromptConfig(adapter_len=n, adapter_layers=num_layers)`, its
`...layers.{l}.self_attn.adaption_prompt` [1, n, D] and `...adaption_gate` [1].
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from additive_jax.peft.base import Method, require_positive_int


@dataclasses.dataclass(frozen=True)
class AdaptionPrompt(Method):
  """`AdaptionPrompt(num_tokens, num_layers)`: prompts of n vectors in the top `num_layers`."""
  num_tokens: int
  num_layers: int

  key: ClassVar[str] = 'adaption_prompt'
  # The paper's LLaMA-7B setting is n = 10 in the top 30 of 32 layers (the official
  # alpaca_finetuning_v1/finetuning.sh: --adapter_len 10 --adapter_layer 30): the lowest two
  # layers stay unadapted. SmolLM2-135M has 30 layers; 28 leaves the same lowest two.
  presets: ClassVar[dict] = {'adaption_prompt': {'num_tokens': 10, 'num_layers': 28}}
  # The same script: AdamW, --blr 9e-3 --weight_decay 0.02. Its blr is scaled by the batch
  # (lr = blr · 32 sequences / 256 = 1.1e-3 there); our runs are a few hundred steps of small
  # batches, so the paper's 9e-3 is taken as it is written, with its weight decay.
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 9e-3, 'weight_decay': 0.02}

  def __post_init__(self):
    require_positive_int('AdaptionPrompt', 'num_tokens', self.num_tokens)
    require_positive_int('AdaptionPrompt', 'num_layers', self.num_layers)

  def check(self, config) -> None:
    if self.num_layers > config.num_layers:
      raise ValueError(f'AdaptionPrompt num_layers={self.num_layers} exceeds the model\'s '
                       f'{config.num_layers} layers')

  def num_params(self, config) -> int:
    return self.num_layers * (self.num_tokens * config.hidden_size + 1)

  def token_matmul_params(self, config) -> int:
    return 0  # the prompt is projected once a layer; tokens multiply its keys, not it

  def init_leaves(self, rng, config, params, tokenizer=None):
    shape = (self.num_layers, self.num_tokens, config.hidden_size)
    return {'prompt_LPD': jax.random.normal(rng, shape, jnp.float32),
            'gate_L': jnp.zeros((self.num_layers,), jnp.float32)}

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'adaption_prompt', 'adapter_len': self.num_tokens,
            'adapter_layers': self.num_layers, 'num_layers': config.num_layers}

  def layer_inputs(self, tree, config):
    """Every layer's prompt and gate, zero below the adapted layers, and whether it is adapted.

    The scan runs one body for every layer, so the lower layers compute the adapter's
    attention too (n keys against the T of the layer's own attention: small) and `active`
    discards it with a select, exact whatever it computed; a lax.cond would skip it only
    outside vmap (a stack of adapters runs vmapped, where it becomes the same select). The
    zero gate makes a padded layer add exactly zero on its own as well: a stack widens a
    shallower adapter with such layers (`widen`)."""
    below = config.num_layers - self.num_layers
    return {'prompt_LPD': jnp.pad(tree['prompt_LPD'], ((below, 0), (0, 0), (0, 0))),
            'gate_L': jnp.pad(tree['gate_L'], (below, 0)),
            'active_L': jnp.arange(config.num_layers) >= below}

  def attn_heads_delta(self, p, q_BTNH, project_kv):
    dtype = q_BTNH.dtype
    k_PKH, v_PKH = project_kv(p['prompt_LPD'].astype(dtype))
    batch, length, heads, head_dim = q_BTNH.shape
    kv_heads = k_PKH.shape[1]
    q_BTKGH = q_BTNH.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores_BTKGP = jnp.einsum('btkgh,pkh->btkgp', q_BTKGH, k_PKH.astype(dtype)) / jnp.asarray(
        math.sqrt(head_dim), dtype)
    probs_BTKGP = jax.nn.softmax(scores_BTKGP.astype(jnp.float32), axis=-1).astype(dtype)
    probs_BTKGP = p['gate_L'].astype(dtype) * probs_BTKGP
    out_BTKGH = jnp.einsum('btkgp,pkh->btkgh', probs_BTKGP, v_PKH.astype(dtype))
    return jnp.where(p['active_L'], out_BTKGH.reshape(q_BTNH.shape), jnp.zeros((), dtype))

  def stack_with(self, others, config) -> AdaptionPrompt:
    """The same num_tokens at the largest num_layers: a shallower adapter's extra layers get
    a zero gate, which adds exactly zero. Another num_tokens is refused: zero prompt slots
    would still take softmax weight from the real ones."""
    other = next((m for m in others if m.num_tokens != self.num_tokens), None)
    if other is not None:
      raise ValueError(f'{self.call_string()} and {other.call_string()} cannot share a stack: '
                       'a zero-padded prompt slot still takes softmax weight, so the prompts '
                       'need one num_tokens')
    return dataclasses.replace(self, num_layers=max(m.num_layers for m in (self, *others)))

  def widen(self, tree, wide: AdaptionPrompt, config):
    below = wide.num_layers - self.num_layers
    return {'prompt_LPD': jnp.pad(jnp.asarray(tree['prompt_LPD']), ((below, 0), (0, 0), (0, 0))),
            'gate_L': jnp.pad(jnp.asarray(tree['gate_L']), (below, 0))}
