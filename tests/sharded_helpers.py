"""Shared by the sharded-trainer tests: a few steps of the trainer on
a mesh, and the comparison of the trainables two runs end with."""

import jax
import numpy as np

from additive_jax.model.llama import Llama
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning
from additive_jax.train.config import RULES
from additive_jax.train.mesh import global_batch
from additive_jax.train.model_state import create_train_state, load_base
from additive_jax.train.optimizer import make_optimizer, method_settings
from additive_jax.train.step import jit_train_step

# Sizes every mesh axis divides: vocab 128, D 48, F 80, 6 query and 2 KV heads.
METHODS = (Bottleneck(dim=8, placement='houlsby'), IA3(),
           LoRA(rank=4, alpha=8, targets=('q', 'v', 'down')), PrefixTuning(num_tokens=3))
STEPS = 3


def batches(vocab, rows=8, length=16):
  rng = np.random.RandomState(0)
  out = []
  for _ in range(STEPS):
    tokens = rng.randint(0, vocab, (rows, length + 1)).astype(np.int32)
    out.append({'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
                'loss_mask': (rng.rand(rows, length) < 0.7).astype(np.float32),
                'positions': np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
                'segment_ids': np.ones((rows, length), np.int32)})
  return out


def setup(checkpoint, mesh, accumulation=1, rules=RULES, quant='none', quant_block=0):
  """(the jitted step, the initial state, the params on the mesh, the fallback report)."""
  config, params, param_shardings, fallback = load_base(checkpoint, mesh, rules, quant,
                                                        quant_block)
  model = Llama(config, peft=METHODS)
  settings = {m.key: method_settings(type(m), {'schedule': 'constant'}) for m in METHODS}
  optimizer = make_optimizer(list(settings), settings, STEPS)
  state, state_shardings = create_train_state(model, params, optimizer, jax.random.key(0), mesh)
  step = jit_train_step(model, optimizer, accumulation, mesh, rules, state_shardings,
                        param_shardings)
  return step, state, params, fallback


def train(checkpoint, mesh, accumulation=1, quant='none', quant_block=0):
  """(losses, final state, params before, params after, the fallback report) of STEPS steps."""
  step, state, params, fallback = setup(checkpoint, mesh, accumulation, quant=quant,
                                        quant_block=quant_block)
  config_vocab = params['embed_tokens']['embedding'].shape[0]
  before = jax.tree.map(np.asarray, params)
  losses = []
  for batch in batches(config_vocab):
    state, metrics = step(state, params, global_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  return losses, state, before, params, fallback


def flat(peft):
  """{'['method']['leaf']...': array} of a 'peft' tree."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(peft)}


def assert_same_trainables(ours, ref):
  """Each method's values, max|ours − ref| / max|ref| ≤ 1e-5 over its subtree. (Per leaf is too
  strict for Adam: a zero-initialized leaf holds only updates, and where a gradient is near
  Adam's ε (a dead relu unit), m / (√v + ε) turns fp32 reduction-order differences into ~1e-5
  of the learning rate.)"""
  assert sorted(ours) == sorted(ref)
  for method in {path.split(']')[0] for path in ref}:
    paths = [path for path in ref if path.startswith(method + ']')]
    ours_values = np.concatenate([np.ravel(ours[path]) for path in paths])
    ref_values = np.concatenate([np.ravel(ref[path]) for path in paths])
    assert np.abs(ours_values - ref_values).max() <= 1e-5 * np.abs(ref_values).max(), method
