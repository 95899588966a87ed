"""The decoding state of a Llama: every layer's keys and values, and each method's own.

    cache = model.init_cache(batch, max_tokens)     # Llama.init_cache: the slots, empty
    logits, cache = model.apply(variables, tokens, attention_mask=mask, cache=cache)

The cache is carried through the layer scan and written in place (`Block`), so a
jitted step that donates it updates its buffers without copying them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from additive_jax.model.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, for decoding one step at a time.

  `valid` marks filled, non-padding slots; `end` is the number of slots written
  (the same for the whole batch; left-pad prompts to align them). `methods` holds
  the decoding state of methods that keep their own (`Hooks.init_cache`); `fresh`
  (static) is True until the first call fills the cache, the prefill, which is
  when vectors a method prepends enter. `Llama.init_cache` makes one for a model.
  """
  k_LBSKH: jax.Array
  v_LBSKH: jax.Array
  valid_BS: jax.Array
  end: jax.Array
  methods: dict = flax.struct.field(default_factory=dict)
  fresh: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32,
             methods: dict | None = None) -> KVCache:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32), methods or {})
