"""The train and eval steps: gradients of the trainable partition only.

`jax.value_and_grad` differentiates the loss with respect to `state.peft`; the
frozen base `params` is an ordinary input, so no gradient (and no optimizer
state) ever exists for it; a method's frozen leaves (`Method.frozen_keys`) are read under
stop_gradient, so none is built for them either. Gradient accumulation splits the batch into
micro-batches inside the step and sums the token-weighted loss and gradients
with `lax.scan`, so the result equals one step on the whole batch. A method's own loss
term (`Method.extra_loss`) adds its gradient once a step, and a method's scheduled leaves
(`Method.after_step`) are set after the update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jax.sharding import Mesh

from additive_jax.peft.base import advance, stop_frozen
from additive_jax.train.loss import masked_token_loss, methods_extra_loss
from additive_jax.train.mesh import Rules, batch_sharding, replicated


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  peft: dict
  opt_state: optax.OptState

  @classmethod
  def create(cls, peft, optimizer: optax.GradientTransformation) -> TrainState:
    return cls(jnp.zeros((), jnp.int32), peft, optimizer.init(peft))


def batch_loss(model, peft, params, batch, budget: int | None = None):
  """(summed token loss, (number of loss tokens, whether the batch overflowed `budget`)) of
  one batch, the LM head applied at its loss positions alone (`train/loss.py`)."""
  peft = stop_frozen(model.peft, peft)
  hidden_BTD = model.apply({'params': params, 'peft': peft}, batch['tokens'],
                           positions=batch['positions'], segment_ids=batch['segment_ids'],
                           return_hidden=True)
  loss_sum, weight, overflowed = masked_token_loss(model.config, params, hidden_BTD,
                                                   batch['targets'], batch['loss_mask'], budget)
  return loss_sum, (weight, overflowed)


def train_step(model, optimizer, accumulation: int, state: TrainState, params, batch, *,
               budget: int | None = None):
  """One optimizer step over `batch` (leaves [B, T]) in `accumulation` micro-batches; `budget`
  is the loss positions a row whose logits are computed (None: every position)."""
  grad_fn = jax.value_and_grad(functools.partial(batch_loss, model, budget=budget), has_aux=True)

  def micro_step(totals, micro_batch):
    (loss_sum, (weight, overflowed)), grads = grad_fn(state.peft, params, micro_batch)
    return jax.tree.map(jnp.add, totals, (grads, loss_sum, weight, overflowed.astype(jnp.int32))), None

  # Micro-batch a takes rows a, a + A, a + 2A, ...: each device's contiguous block of the
  # batch holds an equal part of every micro-batch, so splitting moves no data between devices.
  micro_batches = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accumulation, accumulation, *x.shape[1:]).swapaxes(0, 1),
      batch)
  zeros = (jax.tree.map(jnp.zeros_like, state.peft), jnp.zeros(()), jnp.zeros(()),
           jnp.zeros((), jnp.int32))
  (grads, loss_sum, weight, overflowed), _ = jax.lax.scan(micro_step, zeros, micro_batches)
  # A batch with no loss tokens has zero gradients (Adam's momentum still moves the leaves);
  # the floor only avoids 0 / 0.
  weight = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  if methods_extra_loss(model.peft, state.peft, state.step) is not None:
    # a method's own term (AdapterFusion's regularization): once a step, whatever the
    # accumulation, beside the token loss it is not averaged with
    extra = jax.grad(functools.partial(methods_extra_loss, model.peft))(state.peft, state.step)
    grads = jax.tree.map(jnp.add, grads, extra)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.peft)
  # leaves a schedule sets (AdapterFusion's temperature), at the step that follows
  peft = advance(model.peft, optax.apply_updates(state.peft, updates), state.step + 1)
  grad_norm = optax.tree.norm(grads)
  metrics = {'loss': loss_sum / weight, 'grad_norm': grad_norm, 'loss_tokens': weight,
             # with config.nonfinite='skip', the optimizer did not apply this step's update
             'nonfinite': ~(jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)),
             'tokens': jnp.sum(batch['segment_ids'] > 0),
             'loss_overflow': overflowed}  # micro-batches whose loss positions overran the budget
  return TrainState(state.step + 1, peft, opt_state), metrics


@dataclasses.dataclass(frozen=True)
class OnMesh:
  """A jitted step called (and so traced) with `mesh` set and the logical axis `rules` in
  force: the model's activation constraints then keep the batch split as the rules say."""
  jitted: Any
  mesh: Mesh
  rules: Rules

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(*args)


def jit_train_step(model, optimizer, accumulation: int, mesh, rules, state_shardings,
                   param_shardings, budget: int | None = None):
  """`train_step` compiled for `mesh`: the state donated (updated in place), the base read
  where it lies, the batch split over the data axes; metrics replicated."""
  step = functools.partial(train_step, model, optimizer, accumulation, budget=budget)
  return OnMesh(jax.jit(step, in_shardings=(state_shardings, param_shardings, batch_sharding(mesh)),
                        out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0),
                mesh, rules)


def jit_eval_step(model, mesh, rules, param_shardings, budget: int | None = None):
  return OnMesh(jax.jit(functools.partial(eval_step, model, budget=budget),
                        in_shardings=(replicated(mesh), param_shardings, batch_sharding(mesh)),
                        out_shardings=replicated(mesh)), mesh, rules)


def eval_step(model, peft, params, batch, budget: int | None = None):
  """Summed loss and token count, to be added over an evaluation set."""
  loss_sum, (weight, _) = batch_loss(model, peft, params, batch, budget)
  return {'loss_sum': loss_sum, 'loss_tokens': weight}
