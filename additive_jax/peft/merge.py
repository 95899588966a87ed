"""Folding mergeable methods ((IA)³, LoRA) into the frozen weights, and back.

    model2, variables2 = merge(model, variables)
    params = unmerge(model, variables2['params'], variables['peft'])

`merge` returns the same Llama without the mergeable methods and variables whose
'params' hold them folded in; the other methods (bottleneck, prompt, prefix, …)
stay in `variables2['peft']` and act as before, so the logits are unchanged.
`unmerge` takes the original model (the one that still lists the mergeable
methods) and the original 'peft' tree, and gives the base weights back.

Order. Several methods may touch one weight, and the model applies their hooks
in a fixed order that a merge must reproduce:
  * at a projection (`project` hooks: LoRA, (IA)³'s l_k, l_v) each method
    transforms the output of the ones before it, so their folds go in the order
    of `model.peft`: W ← (IA)³ then LoRA gives l ⊙ W + (α/r)·A·B;
  * the MLP hidden activation (`mlp_hidden` hooks: (IA)³'s l_ff) is scaled
    before down_proj and every `project` hook on it reads the scaled input, so
    its fold comes after all projection folds: W_down ← diag(l_ff)·(W_down + (α/r)·A·B),
    whatever the order of the methods.
So each mergeable method's `merge(tree, params, config, stage)` folds one stage
at a time ('project', then 'mlp_hidden'; `stage=None` folds both, for one method
alone), and `unmerge` undoes the stages in exactly the reverse sequence.

Precision. A merged weight is rounded to its own dtype. In fp32 the merged logits
match the unmerged ones to ~1e-6 relative and `unmerge` restores each weight to
within one or two fp32 roundings (see ia3.py, lora.py). In bf16 the rounding of
the merged weight (2⁻⁸ relative) changes the logits and the base cannot be
recovered, so `merge` refuses a base that is not fp32 unless told
`allow_low_precision=True` (for deployment, when the unmerged base is kept
elsewhere). A base in blocks (`base_quant`, model/quant.py) is refused whatever the flag:
the merged weight would be rounded to the blocks' grid again, or kept widened (PEFT #2321
merges into a widened copy without a word), and either is a model the adapter was not
trained as. Merge and unmerge are eager, one-off tree surgery, not for `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from additive_jax.model.quant import is_quantized

STAGES = ('project', 'mlp_hidden')


def stages(stage) -> tuple[str, ...]:
  """The stages a `merge(..., stage)` call folds: all of them for None."""
  if stage is None:
    return STAGES
  if stage not in STAGES:
    raise ValueError(f'merge stage must be one of {STAGES} or None, got {stage!r}')
  return (stage,)


def merge(model, variables, allow_low_precision: bool = False):
  """(model without its mergeable methods, variables with them folded into 'params')."""
  mergeable = [m for m in model.peft if m.mergeable]
  trees = variables.get('peft', {})
  params = variables['params']
  if mergeable and is_quantized(params):
    raise ValueError('merge folds the methods into base weights stored in blocks (base_quant): '
                     'the merged weights would be rounded to the blocks again, or widened, a '
                     'model the adapter was not trained as; keep the adapter apart (save_adapter) '
                     'and apply it over the same base')
  if mergeable and not allow_low_precision:
    low = sorted({str(x.dtype) for x in jax.tree.leaves(params)
                  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32})
    if low:
      raise ValueError(f'merge folds the methods into base weights stored as {", ".join(low)}: '
                       'rounding the merged weights changes the logits and unmerge could not '
                       'restore the base. Merge an fp32 copy of the params, or pass '
                       'allow_low_precision=True to accept the rounding')
  for method in mergeable:
    params = method.merge(trees[method.key], params, model.config, stage='project')
  for method in reversed(mergeable):  # the innermost hidden scaling is folded last
    params = method.merge(trees[method.key], params, model.config, stage='mlp_hidden')
  rest = tuple(m for m in model.peft if not m.mergeable)
  return (model.clone(peft=rest),
          {'params': params, 'peft': {m.key: trees[m.key] for m in rest}})


def unmerge(model, merged_params, peft_tree):
  """The base params before `merge(model, ...)`: each fold undone in reverse order."""
  mergeable = [m for m in model.peft if m.mergeable]
  missing = [m.key for m in mergeable if m.key not in peft_tree]
  if missing:
    raise ValueError(f'unmerge needs the trees of the merged methods {missing}; '
                     f'the peft tree has {sorted(peft_tree)}')
  params = merged_params
  for method in mergeable:
    params = method.unmerge(peft_tree[method.key], params, model.config, stage='mlp_hidden')
  for method in reversed(mergeable):
    params = method.unmerge(peft_tree[method.key], params, model.config, stage='project')
  return params


def inference_form(model, variables):
  """(model, variables) with each method in its inference form (`Method.fold`): what scoring
  and decoding run, the same logits as training's form."""
  folded = [m.fold(variables['peft'][m.key], model.config) for m in model.peft]
  return (model.clone(peft=tuple(method for method, _ in folded)),
          {'params': variables['params'], 'peft': {m.key: tree for m, tree in folded}})
