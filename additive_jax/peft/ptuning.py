"""P-tuning: a soft prompt produced by a small trainable encoder from n free embeddings.

As prompt tuning (peft/prompt.py), the frozen model reads n vectors before the token
embeddings, at positions 0…n−1, with logits returned for the real tokens only; the
vectors are the output of a prompt encoder f applied to n free embeddings E:

    h_0 = concat(f(E), embed(tokens_BT))        E: [n, D], f(E): [n, D]

    encoder='mlp'   f(E) = W_3 relu(W_2 relu(W_1 E + b_1) + b_2) + b_3
                    (W_1: D→R, W_2: R→R, W_3: R→D)
    encoder='lstm'  f(E) = W_2 relu(W_1 lstm(E) + b_1) + b_2
                    (lstm: a bidirectional torch.nn.LSTM of `encoder_layers` layers of width R,
                    its output [n, 2R] = [forward; backward]; W_1: 2R→2R, W_2: 2R→D)

with R = `encoder_hidden` (D when None, PEFT's default). The encoder reads all n tokens
at once, so every prompt vector depends on every embedding (the paper's point: the
vectors are not independent). The LSTM is torch's: per direction and layer, with gates
in torch's order (i, f, g, o),

    i, f, g, o = split(x W_ih + b_ih + h W_hh + b_hh)
    c' = σ(f) c + σ(i) tanh(g),    h' = σ(o) tanh(c'),    h = c = 0 at the start,

the backward direction reading the sequence reversed, its outputs put back in order. A
layer after the first reads the [n, 2R] output of the one before.

Parameters, with D the hidden size, R the encoder width and L the LSTM layers:
    mlp   n·D + (D·R + R) + (R·R + R) + (R·D + D)
    lstm  n·D + 2·(4R·(D + R) + 8R) + (L − 1)·2·(4R·(2R + R) + 8R)
          + (2R·2R + 2R) + (2R·D + D)
(each LSTM direction keeps torch's two bias vectors, b_ih and b_hh, whose sum alone matters:
kept so that the count and the weights are PEFT's). PEFT's prompt-based-methods guide on
bloomz-560m (D = 1024, n = 20, R = 128, MLP): 300,288, as its guide prints.

The encoder runs once a step, on n vectors, not per token (`token_matmul_params` is 0,
as for prompt tuning); `fold` evaluates it once into the plain `PromptTuning(n)` holding
f(E), which inference, export and `aj.peft.stack` use: P-tuning adds nothing at
inference that prompt tuning does not have. Adapters of one n stack as prompts do (other
n are refused, as PromptTuning refuses them); a model holds one soft prompt, so PTuning
beside PromptTuning is refused (both would infer as a PromptTuning).

Initialization, as PEFT's torch modules: E ~ N(0, 1) (torch.nn.Embedding), each Linear's
weight and bias ~ U(±1/√fan_in), every LSTM weight and bias ~ U(±1/√R). Like prompt tuning
it is not the identity at init. No dropout: PEFT's `encoder_dropout` (default 0) only acts
between LSTM layers in training (its MLP ignores it); like every method here, P-tuning
trains without dropout.

Leaves (fp32): 'embedding_PD' [n, D]; 'mlp': 'layer0'… {'kernel' [in, out], 'bias' [out]}
(three for 'mlp', two after the LSTM); 'lstm' (encoder='lstm'): 'layer0'… {'input_kernel'
[2, I, 4R], 'hidden_kernel' [2, R, 4R], 'input_bias' [2, 4R], 'hidden_bias' [2, 4R]},
the leading 2 the (forward, backward) directions, I the layer's input width (D, then 2R).

Liu, Zheng, Du, Ding, Qian, Yang & Tang, "GPT Understands, Too", 2021 (arXiv 2103.10385).
HF PEFT: `PromptEncoderConfig(num_virtual_tokens=n, encoder_reparameterization_type='MLP'|
'LSTM', encoder_hidden_size=R, encoder_num_layers=L)` (`encoder_num_layers` is ignored by its
MLP, which always has 3 linear layers, though its warning says "Exactly 2 MLP layers": here
`encoder_layers` applies to the LSTM only).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from additive_jax.peft.base import Method, require_positive_int
from additive_jax.peft.prompt import PromptTuning, check_positions

ENCODERS = ('mlp', 'lstm')


def linear_init(key, fan_in: int, fan_out: int) -> dict:
  """torch.nn.Linear's default: weight and bias ~ U(±1/√fan_in); the kernel kept [in, out]."""
  bound = 1.0 / fan_in ** 0.5
  k_kernel, k_bias = jax.random.split(key)
  return {'kernel': jax.random.uniform(k_kernel, (fan_in, fan_out), jnp.float32, -bound, bound),
          'bias': jax.random.uniform(k_bias, (fan_out,), jnp.float32, -bound, bound)}


def lstm_layer_init(key, fan_in: int, width: int) -> dict:
  """One bidirectional layer of torch.nn.LSTM: every weight and bias ~ U(±1/√width)."""
  bound = 1.0 / width ** 0.5
  shapes = {'input_kernel': (2, fan_in, 4 * width), 'hidden_kernel': (2, width, 4 * width),
            'input_bias': (2, 4 * width), 'hidden_bias': (2, 4 * width)}
  keys = jax.random.split(key, len(shapes))
  return {name: jax.random.uniform(k, shape, jnp.float32, -bound, bound)
          for k, (name, shape) in zip(keys, shapes.items())}


def lstm_layer(p, x_PI):
  """[n, 2R] outputs of one bidirectional torch LSTM layer over x_PI [n, I]: [forward; backward]."""
  # both directions' input projections at once; the backward one reads the tokens reversed
  gates_2PG = jnp.einsum('pi,dig->dpg', x_PI, p['input_kernel']) + (
      p['input_bias'] + p['hidden_bias'])[:, None]
  gates_2PG = gates_2PG.at[1].set(gates_2PG[1, ::-1])
  width = p['hidden_kernel'].shape[1]

  def step(carry, gates_2G):
    h_2R, c_2R = carry
    i, f, g, o = jnp.split(gates_2G + jnp.einsum('dr,drg->dg', h_2R, p['hidden_kernel']), 4, -1)
    c_2R = jax.nn.sigmoid(f) * c_2R + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_2R = jax.nn.sigmoid(o) * jnp.tanh(c_2R)
    return (h_2R, c_2R), h_2R

  zeros_2R = jnp.zeros((2, width), x_PI.dtype)
  _, h_P2R = jax.lax.scan(step, (zeros_2R, zeros_2R), jnp.swapaxes(gates_2PG, 0, 1))
  return jnp.concatenate([h_P2R[:, 0], h_P2R[::-1, 1]], axis=-1)


@dataclasses.dataclass(frozen=True)
class PTuning(Method):
  """`PTuning(num_tokens, encoder='mlp'|'lstm', encoder_hidden=None, encoder_layers=2)`;
  `encoder_hidden=None` is the model's hidden size (PEFT's default)."""
  num_tokens: int
  encoder: str = 'mlp'
  encoder_hidden: int | None = None
  encoder_layers: int = 2

  key: ClassVar[str] = 'ptuning'
  # PEFT's guides (docs/source/task_guides/prompt_based_methods.md, ptuning-seq-classification.md):
  # PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128), the MLP encoder
  presets: ClassVar[dict] = {'ptuning': {'num_tokens': 20, 'encoder': 'mlp', 'encoder_hidden': 128}}
  # PEFT's P-tuning sequence-classification guide (ptuning-seq-classification.md): AdamW, 1e-3
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 1e-3}

  def __post_init__(self):
    require_positive_int('PTuning', 'num_tokens', self.num_tokens)
    if self.encoder not in ENCODERS:
      raise ValueError(f'PTuning encoder must be one of {ENCODERS}, got {self.encoder!r}')
    if self.encoder_hidden is not None:
      require_positive_int('PTuning', 'encoder_hidden', self.encoder_hidden)
    require_positive_int('PTuning', 'encoder_layers', self.encoder_layers)
    if self.encoder == 'mlp' and self.encoder_layers != 2:
      raise ValueError(f"PTuning encoder_layers={self.encoder_layers} applies to encoder='lstm' "
                       "only; the MLP encoder has 3 linear layers, as PEFT's (which ignores "
                       'encoder_num_layers for it)')

  def width(self, config) -> int:
    """R: the encoder's hidden width."""
    return config.hidden_size if self.encoder_hidden is None else self.encoder_hidden

  @property
  def num_virtual_tokens(self) -> int:
    return self.num_tokens

  def check(self, config) -> None:
    check_positions('PTuning', self.num_tokens, config)

  def token_matmul_params(self, config) -> int:
    return 0  # the encoder runs once a step on n vectors; the vectors cost the positions they take

  def num_params(self, config) -> int:
    n, d, r = self.num_tokens, config.hidden_size, self.width(config)
    if self.encoder == 'mlp':
      return n * d + (d * r + r) + (r * r + r) + (r * d + d)
    lstm = 2 * (4 * r * (d + r) + 8 * r) + (self.encoder_layers - 1) * 2 * (4 * r * 3 * r + 8 * r)
    return n * d + lstm + (2 * r * 2 * r + 2 * r) + (2 * r * d + d)

  def init_leaves(self, rng, config, params, tokenizer=None):
    n, d, r = self.num_tokens, config.hidden_size, self.width(config)
    k_embedding, k_mlp, k_lstm = jax.random.split(rng, 3)
    if self.encoder == 'mlp':
      widths = [d, r, r, d]
    else:
      widths = [2 * r, 2 * r, d]
      lstm_keys = jax.random.split(k_lstm, self.encoder_layers)
    leaves = {'embedding_PD': jax.random.normal(k_embedding, (n, d), jnp.float32),
              'mlp': {f'layer{i}': linear_init(key, widths[i], widths[i + 1])
                      for i, key in enumerate(jax.random.split(k_mlp, len(widths) - 1))}}
    if self.encoder == 'lstm':
      leaves['lstm'] = {f'layer{i}': lstm_layer_init(key, d if i == 0 else 2 * r, r)
                        for i, key in enumerate(lstm_keys)}
    return leaves

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'p_tuning', 'num_virtual_tokens': self.num_tokens,
            'token_dim': config.hidden_size,
            'encoder_reparameterization_type': self.encoder.upper(),
            'encoder_hidden_size': self.width(config), 'encoder_num_layers': self.encoder_layers}

  def layer_inputs(self, tree, config):
    return None  # nothing per layer: the prompt acts at the embeddings only

  def prompt(self, tree):
    """f(E): the encoder's output [n, D], the prompt the model reads."""
    x = tree['embedding_PD']
    if self.encoder == 'lstm':
      for i in range(self.encoder_layers):
        x = lstm_layer(tree['lstm'][f'layer{i}'], x)  # [n, D], then [n, 2R]
    linears = len(tree['mlp'])
    for i in range(linears):  # ReLU between the linear layers, none after the last
      x = x @ tree['mlp'][f'layer{i}']['kernel'] + tree['mlp'][f'layer{i}']['bias']
      x = jax.nn.relu(x) if i < linears - 1 else x
    return x

  def prepend(self, tree):
    return self.prompt(tree)

  def fold(self, tree, config) -> tuple[PromptTuning, dict]:
    """`(PromptTuning(num_tokens), {'prompt_PD': f(E)})`: the encoder evaluated once; the same
    logits, n·D parameters."""
    return PromptTuning(self.num_tokens), {'prompt_PD': self.prompt(tree)}
