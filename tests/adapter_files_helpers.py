"""Shared by the adapter-file tests: random adapter values, logits with and without PEFT, HF
PEFT's model holding our values, and leaf-by-leaf equality."""

import copy
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from additive_jax.model.llama import Llama
from additive_jax.peft.param_count import leaf_shapes
from additive_jax.peft.files import save_adapter


def random_peft(methods, config, seed=0):
  """Random values for every leaf, none at its identity init, so every term shows in the logits:
  (IA)³ vectors U(0.5, 1.5), all else N(0, 0.1²) (LoRA's B and the up-projections included)
  but the signs on LoReFT's diagonal."""
  rng = np.random.RandomState(seed)
  flat = {name: (rng.uniform(0.5, 1.5, shape) if name.startswith('ia3/') else
                 0.1 * np.asarray(rng.randn(*shape))).astype(np.float32)
          for name, shape in leaf_shapes(methods, config).items()}
  if 'reft/original' in flat:  # LoReFT's signs: ±1 on the diagonal, as it keeps them
    original = flat['reft/original']
    diagonal = np.arange(min(original.shape[-2:]))
    original[..., diagonal, diagonal] = rng.choice([-1.0, 1.0], original.shape[:-2] + diagonal.shape)
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


def peft_model_holding(hf_model, method, tree, config, directory):
  """HF PEFT's model of `method` on a copy of `hf_model`, holding our leaves `tree`: written by our
  PEFT export (`save_adapter(..., format='hf_peft')`, where the name mapping lives) into
  `directory`, read by `PeftModel.from_pretrained`. Every tensor of the file is one of the
  model's adapter weights, and every adapter weight is in the file."""
  import peft  # only the files compared with PEFT need it
  save_adapter(str(directory), (method,), {method.key: tree}, config, format='hf_peft')
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(directory)).eval()
  written = load_file(os.path.join(directory, 'adapter_model.safetensors'))
  assert set(written) == set(peft.get_peft_model_state_dict(peft_model))
  return peft_model


def assert_same_leaves(got, want):
  """The same leaf names and values, bit for bit, each read as fp32."""
  got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert got.keys() == want.keys()
  for name in want:
    assert got[name].dtype == np.float32, name
    np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=str(name))
