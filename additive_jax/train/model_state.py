"""The frozen base on the mesh, and the trainable state beside it.

Abstract shapes first (`jax.eval_shape`), then shardings from the logical-axis
rules, then data: the base is read on the host and placed shard by shard, so no
device ever holds more than its own shards; the trainable state is made by a
jitted init whose `out_shardings` put it where the train step expects it. The
trainable partition and its optimizer state are small: they are replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from additive_jax.model.config import LlamaConfig
from additive_jax.model.llama import Llama, abstract_variables
from additive_jax.model.load import base_layout, load_config, load_model
from additive_jax.model.quant_layout import Layout, abstract_quantized
from additive_jax.train.mesh import Rules, replicated, shardings_for
from additive_jax.train.step import TrainState


def base_shardings(config: LlamaConfig, mesh: Mesh, rules: Rules, layout: Layout | None = None):
  """(NamedSharding per base weight, [(path, axis, size, mesh axis) replicated instead]); a
  weight in blocks (`layout`) shards its codes and scales by the weight's axis names."""
  return shardings_for(abstract_quantized(abstract_variables(config)['params'], layout), mesh,
                       rules)


def load_base(path: str, mesh: Mesh, rules: Rules, quant: str = 'none', quant_block: int = 0,
              **overrides):
  """(config, params on the mesh, their shardings, the replicated-instead report)."""
  layout = base_layout(path, quant, quant_block, **overrides)
  shardings, fallback = base_shardings(load_config(path, **overrides), mesh, rules, layout)
  config, params = load_model(path, shardings=shardings, quant=quant, quant_block=quant_block,
                              **overrides)
  return config, params, shardings, fallback


def create_train_state(model: Llama, params, optimizer, rng, mesh: Mesh, tokenizer=None,
                       peft=None):
  """(TrainState at its initial value, replicated on `mesh`; the state's shardings). `peft`:
  trainables to start from (config.start_from) instead of the methods' init."""
  def init(rng, params, peft):
    if peft is None:
      peft = model.init_peft(rng, params, tokenizer)['peft']
    return TrainState.create(peft, optimizer)

  shardings = jax.tree.map(lambda _: replicated(mesh), jax.eval_shape(init, rng, params, peft))
  return jax.jit(init, out_shardings=shardings)(rng, params, peft), shardings

