"""A finished (or running) run's trainables, read back from its workdir for export, decoding and
evaluation.

    run = restore_run(workdir, checkpoint='best')   # 'latest', 'best' or a step number
    model = aj.Llama(load_config(run.config['model']), peft=run.methods)

The abstract state it restores into comes from the run's saved config alone: the
model's shapes (`config.json` or the GGUF's metadata), the methods of
`config.peft` and the optimizer; no base weight is read. The checkpoints are
opened read-only, so a run may be read while it is still training. Which step
'latest', 'best' and a number mean is `train.workdir.chosen_step`'s, the trainer's.
"""

from __future__ import annotations

import dataclasses

from flax import traverse_util
import jax
import jax.numpy as jnp

from additive_jax.model.load import load_config
from additive_jax.peft.param_count import leaf_shapes
from additive_jax.train.config_checks import methods_of
from additive_jax.train.optimizer import run_optimizer
from additive_jax.train.step import TrainState
from additive_jax.train.workdir import RunFolder, chosen_step


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


def restore_run(workdir: str, checkpoint: str | int | None = 'latest',
                trainables: bool = True) -> RestoredRun:
  """The run's config, methods and step (`trainables=False`: nothing else is read; `peft` is
  None), and its trainables at that step."""
  checkpoints = RunFolder(workdir).read_checkpoints()
  try:
    step = chosen_step(checkpoints, checkpoint)
    config = checkpoints.restore_config(step)
    methods = methods_of(config)
    peft = None
    if trainables:
      abstract = abstract_train_state(config, methods, load_config(config['model']))
      peft = checkpoints.restore(step, abstract).peft
  finally:
    checkpoints.close()
  return RestoredRun(config, methods, peft, step)
