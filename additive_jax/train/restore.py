"""A finished (or running) run's trainables, read back from its workdir for export, decoding and
evaluation.

    run = restore_run(workdir, checkpoint='best')   # 'latest', 'best' or a step number
    model = aj.Llama(load_config(run.config['model']), peft=run.methods)

The abstract state it restores into comes from the run's saved config alone: the
model's shapes (`config.json` or the GGUF's metadata), the methods of
`config.peft` and the optimizer; no base weight is read. The checkpoints are
opened read-only, so a run may be read while it is still training. 'best' is
the checkpoint with the lowest eval loss that the run logged (metrics.jsonl).
"""

from __future__ import annotations

import dataclasses

from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp

from additive_jax.model.load import load_config
from additive_jax.peft.param_count import leaf_shapes
from additive_jax.train.checkpoint import CheckpointError, Checkpoints
from additive_jax.train.config_checks import methods_of
from additive_jax.train.metrics_log import logged_value
from additive_jax.train.optimizer import run_optimizer
from additive_jax.train.step import TrainState


@dataclasses.dataclass
class RestoredRun:
  config: dict      # the run's experiment config, as its checkpoint keeps it
  methods: tuple
  peft: dict        # variables['peft'] at `step`, on one device
  step: int


def abstract_train_state(config: dict, methods, model_config):
  """Shapes and dtypes of the run's `TrainState` (trainables fp32, as every method makes
  them), on one device: what a checkpoint of this run restores into."""
  peft = traverse_util.unflatten_dict(
      {name: jax.ShapeDtypeStruct(shape, jnp.float32)
       for name, shape in leaf_shapes(methods, model_config).items()}, sep='/')
  optimizer, _ = run_optimizer(config, methods)
  state = jax.eval_shape(lambda peft: TrainState.create(peft, optimizer), peft)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def chosen_step(workdir: str, steps: list[int], checkpoint: str | int | None) -> int:
  """The step `checkpoint` names: 'latest' (or None), 'best' (lowest logged eval loss), or a
  step number the workdir holds."""
  if not steps:
    raise CheckpointError(f'{workdir} holds no complete checkpoint')
  if checkpoint in (None, 'latest'):
    return steps[-1]
  if checkpoint == 'best':
    losses = {step: logged_value(workdir, 'eval_loss', step) for step in steps}
    evaluated = {step: loss for step, loss in losses.items() if loss is not None}
    if not evaluated:
      raise CheckpointError(f'{workdir}: no checkpoint of steps {steps} has a logged eval_loss '
                            "to choose the best by; ask for 'latest' or a step")
    return min(evaluated, key=evaluated.get)
  try:
    step = int(checkpoint)
  except ValueError:
    raise ValueError(f"checkpoint must be 'latest', 'best' or a step number, got {checkpoint!r}"
                     ) from None
  if step not in steps:
    raise CheckpointError(f'{workdir}/checkpoints has no checkpoint of step {step} (it has steps '
                          f'{steps})')
  return step


def restore_run(workdir: str, checkpoint: str | int | None = 'latest',
                trainables: bool = True) -> RestoredRun:
  """The run's config, methods and step (`trainables=False`: nothing else is read; `peft` is
  None), and its trainables at that step."""
  directory = str(epath.Path(workdir) / 'checkpoints')
  if not epath.Path(directory).is_dir():
    raise CheckpointError(f'{workdir} has no checkpoints folder: no run saved a checkpoint there')
  checkpoints = Checkpoints(directory, read_only=True)
  try:
    step = chosen_step(workdir, checkpoints.all_steps(), checkpoint)
    config = checkpoints.restore_config(step)
    methods = methods_of(config)
    peft = None
    if trainables:
      abstract = abstract_train_state(config, methods, load_config(config['model']))
      peft = checkpoints.restore(step, abstract).peft
  finally:
    checkpoints.close()
  return RestoredRun(config, methods, peft, step)
