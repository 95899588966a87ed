"""Everything a run needs before its first step.

`build` takes a config that `config_checks.check_config` has passed (and the mesh
and methods it returned): it loads the tokenizer and the base onto the mesh, settles
the compute dtype ('auto': bf16 on GPU/TPU, fp32 on CPU) and the attention kernel
(run once at the run's shape, `model/kernel_probe.py`), and builds the model from the
config's methods, the optimizer and the trainable state.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import jax
import ml_collections
from jax.sharding import Mesh

from additive_jax.model.config import DTYPES, compute_dtype_name
from additive_jax.model.kernel_probe import BlockShape, choose_attention
from additive_jax.model.llama import Llama
from additive_jax.model.tokenizer import load_tokenizer
from additive_jax.train.model_state import create_train_state, load_base
from additive_jax.train.optimizer import run_optimizer

@dataclasses.dataclass
class Run:
  """The pieces of a run: what `build` returns and the loop uses."""
  mesh: Mesh
  tokenizer: object
  model: Llama
  params: dict
  param_shardings: dict
  optimizer: object
  optimizer_settings: dict
  state: object
  state_shardings: object
  compute: str  # one line: the backend, the compute dtype and the attention, and why


def build(config: ml_collections.ConfigDict, mesh: Mesh, methods, start_peft=None) -> Run:
  """`start_peft`: the trainables a `config.start_from` run starts from (else the methods'
  init)."""
  tokenizer = load_tokenizer(config.model)
  dtype = compute_dtype_name(config.dtype)
  model_config, params, param_shardings, fallback = load_base(
      config.model, mesh, config.rules, config.base_quant, config.base_quant_block,
      dtype=DTYPES[dtype],
      param_dtype=DTYPES[config.param_dtype], remat=config.remat,
      attention='xla')  # chosen below; the base's shapes are traced with what always traces
  for path, dim, size, axis in fallback:
    logging.info('replicated: %s axis %d (size %d) is not divisible by mesh axis %r',
                 path, dim, size, axis)
  model = Llama(model_config, peft=methods)
  shape = BlockShape(config.seq_len, model_config.num_heads, model_config.num_kv_heads,
                     # a gated prefix attends at twice the head dim (model/llama.py)
                     model_config.head_dim * (2 if any(m.prefix_gated for m in methods) else 1),
                     DTYPES[dtype],
                     sum(method.num_prefix_tokens for method in model.peft),
                     model.num_virtual_tokens)
  attention, note = choose_attention(config.attention, shape)
  model = Llama(model_config.replace(attention=attention), peft=methods)
  compute = (f'{jax.default_backend()} ({jax.devices()[0].device_kind}): computing in {dtype}'
             f'{" (auto)" if config.dtype == "auto" else ""}, attention {attention!r}'
             f'{" (auto)" if config.attention == "auto" else ""}' + (f'\n{note}' if note else ''))
  optimizer, settings = run_optimizer(config, methods)
  state, state_shardings = create_train_state(model, params, optimizer,
                                              jax.random.key(config.seed), mesh, tokenizer,
                                              start_peft)
  return Run(mesh, tokenizer, model, params, param_shardings, optimizer, settings, state,
             state_shardings, compute)

