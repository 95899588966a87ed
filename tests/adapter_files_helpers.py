"""Shared by the adapter-file tests: random adapter values."""

import numpy as np
from flax import traverse_util

from additive_jax.peft.files.aj_format import leaf_shapes


def random_peft(methods, config, seed=0):
  """Random values for every leaf, none at its identity init, so every term shows in the logits:
  (IA)³ vectors U(0.5, 1.5), all else N(0, 0.1²) (LoRA's B and the up-projections included)."""
  rng = np.random.RandomState(seed)
  flat = {name: (rng.uniform(0.5, 1.5, shape) if name.startswith('ia3/') else
                 0.1 * rng.randn(*shape)).astype(np.float32)
          for name, shape in leaf_shapes(methods, config).items()}
  return traverse_util.unflatten_dict(flat, sep='/')
