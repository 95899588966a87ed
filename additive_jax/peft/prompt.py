"""Prompt tuning: n trainable input embeddings prepended to every sequence.

The frozen model reads `[p_1 … p_n, e(x_1) … e(x_T)]`: n free vectors in the
embedding space (the "soft prompt") before the token embeddings. The virtual
tokens take positions 0…n−1 and the real tokens n…n+T−1; the attention mask is
extended with ones (the prompt is never padding) and every packed segment sees
the prompt as if it were alone. `apply` returns logits for the T real positions
only, so the data pipeline knows nothing of virtual tokens.

    h_0 = concat(prompt_PD, embed(tokens_BT))        prompt_PD: [n, D]

Parameters: n · D.

The context must hold both: `check` refuses n ≥ max_position_embeddings, and
the model refuses a call whose n + T exceeds it (T is known only there).

Initialization (as HF PEFT's `PromptTuningInit`):
  'vocab'  rows of the embedding table at n token ids drawn uniformly with
           replacement (PEFT's SAMPLE_VOCAB);
  'text'   the embeddings of `tokenizer(text)['input_ids']` (special tokens
           included, as PEFT calls it), repeated and truncated to n (PEFT's TEXT).
Prompt tuning is not the identity at init by nature: it adds n vectors to
attend to. Its effect is tested against HF PEFT on the same weights.

Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt
Tuning", EMNLP 2021. HF PEFT: `PromptTuningConfig(num_virtual_tokens=n)`, its
`prompt_encoder.<adapter>.embedding.weight` is `prompt_PD`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from additive_jax.peft.base import Method, require_positive_int

INITS = ('vocab', 'text')


@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
  """`PromptTuning(num_tokens, init='vocab'|'text', text=None)`."""
  num_tokens: int
  init: str = 'vocab'
  text: str | None = None

  key: ClassVar[str] = 'prompt'
  presets: ClassVar[dict] = {'prompt': {'num_tokens': 20}}
  # orders of magnitude above the others' (Lester et al. use 0.3 with Adafactor)
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 3e-2}

  def __post_init__(self):
    require_positive_int('PromptTuning', 'num_tokens', self.num_tokens)
    if self.init not in INITS:
      raise ValueError(f'PromptTuning init must be one of {INITS}, got {self.init!r}')
    if self.init == 'text' and not self.text:
      raise ValueError("PromptTuning(init='text') needs text='...', the words whose embeddings "
                       'start the prompt')
    if self.init != 'text' and self.text is not None:
      raise ValueError(f"PromptTuning text is used only with init='text', got init={self.init!r}")

  def check(self, config) -> None:
    check_positions('PromptTuning', self.num_tokens, config)

  def token_matmul_params(self, config) -> int:
    return 0  # the vectors cost the positions they take, counted as tokens

  def num_params(self, config) -> int:
    return self.num_tokens * config.hidden_size

  def init_leaves(self, rng, config, params, tokenizer=None):
    table_VD = params['embed_tokens']['embedding']
    if self.init == 'vocab':
      ids_P = jax.random.randint(rng, (self.num_tokens,), 0, config.vocab_size)
    else:
      ids_P = jnp.asarray(text_token_ids(self.text, tokenizer, self.num_tokens), jnp.int32)
    return {'prompt_PD': jnp.asarray(table_VD)[ids_P].astype(jnp.float32)}

  def shape_alike(self) -> PromptTuning:
    return PromptTuning(self.num_tokens)  # the text init needs a tokenizer for the same shape

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'prompt_tuning', 'num_virtual_tokens': self.num_tokens,
            'token_dim': config.hidden_size}

  def layer_inputs(self, tree, config):
    return None  # nothing per layer: the prompt acts at the embeddings only

  @property
  def num_virtual_tokens(self) -> int:
    return self.num_tokens

  def prepend(self, tree):
    return tree['prompt_PD']


def check_positions(method: str, num_tokens: int, config) -> None:
  """Refuses a prompt that fills the context: a real token needs a position after it."""
  if num_tokens >= config.max_position_embeddings:
    raise ValueError(f'{method} num_tokens={num_tokens} leaves no position for a real token '
                     f'(max_position_embeddings={config.max_position_embeddings})')


def text_token_ids(text: str, tokenizer, num_tokens: int) -> list[int]:
  """The ids of `text`, repeated then truncated to `num_tokens` (HF PEFT's TEXT init)."""
  if tokenizer is None:
    raise ValueError("PromptTuning(init='text') needs the tokenizer: "
                     'model.init_peft(key, params, tokenizer=tokenizer)')
  ids = list(tokenizer(text)['input_ids'])
  if not ids:
    raise ValueError(f'PromptTuning text {text!r} has no tokens')
  return (ids * math.ceil(num_tokens / len(ids)))[:num_tokens]
