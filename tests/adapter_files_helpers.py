"""Shared by the adapter-file tests: random adapter values, logits with and without PEFT, and
leaf-by-leaf equality."""

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from additive_jax.model.llama import Llama
from additive_jax.peft.count import leaf_shapes


def random_peft(methods, config, seed=0):
  """Random values for every leaf, none at its identity init, so every term shows in the logits:
  (IA)³ vectors U(0.5, 1.5), all else N(0, 0.1²) (LoRA's B and the up-projections included)."""
  rng = np.random.RandomState(seed)
  flat = {name: (rng.uniform(0.5, 1.5, shape) if name.startswith('ia3/') else
                 0.1 * rng.randn(*shape)).astype(np.float32)
          for name, shape in leaf_shapes(methods, config).items()}
  return traverse_util.unflatten_dict(flat, sep='/')


def our_logits(config, params, methods, peft_tree, tokens):
  model = Llama(config, peft=tuple(methods))
  return np.asarray(model.apply({'params': params, 'peft': peft_tree}, jnp.asarray(tokens)))


def hf_logits(model, tokens, virtual_tokens=0):
  """A torch model's logits; a PEFT prompt-tuned one also returns its `virtual_tokens` positions."""
  import torch  # only the files compared with PEFT need it
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(tokens)).logits.numpy()
  return logits[:, virtual_tokens:]


def assert_same_leaves(got, want):
  """The same leaf names and values, bit for bit, each read as fp32."""
  got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert got.keys() == want.keys()
  for name in want:
    assert got[name].dtype == np.float32, name
    np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=str(name))
