"""Adapter files from a run's checkpoint.

    python -m additive_jax.export --workdir=DIR --format=aj|hf_peft|adapterhub|merged [--step=N] [--out=DIR]

Reads the run's config from its latest checkpoint (or `--step`) and restores the
trainable partition onto one device, whatever mesh trained it. The abstract state
it restores into comes from the config alone: the model's shapes (`config.json`
or the GGUF's metadata), the methods of `config.peft` and the optimizer; no base
weight is read, except for `merged`, which folds (IA)³ / LoRA into the base.
`aj.peft.save_adapter` / `save_merged` write the files (additive_jax/peft/files/)
to `--out`, by default `DIR/export/<format>_<step>`. The checkpoints are opened
read-only, so a run may export while it is still training.

Bad input gets one line, no traceback: no checkpoint in the workdir, a step it
does not have, a checkpoint that does not fit its own config, a format the run's
methods cannot be written in (a bottleneck in `hf_peft`, a combination outside
`aj`, a method that cannot be folded in `merged`).
"""

import os
import sys

from absl import app, flags
from flax import traverse_util
import jax
import jax.numpy as jnp

from additive_jax import cli
from additive_jax.model.llama import Llama
from additive_jax.model.load import load_config, load_model
from additive_jax.peft.files import save_adapter, save_merged
from additive_jax.peft.count import leaf_shapes
from additive_jax.train.checkpoint import CheckpointError, Checkpoints
from additive_jax.train.config_checks import methods_of
from additive_jax.train.optimizer import run_optimizer
from additive_jax.train.step import TrainState

FORMATS = ('aj', 'hf_peft', 'adapterhub', 'merged')

_WORKDIR = flags.DEFINE_string('workdir', None, "the run's workdir (holding checkpoints/)",
                               required=True)
_FORMAT = flags.DEFINE_enum('format', None, FORMATS, 'the adapter format, or a merged HF checkpoint',
                            required=True)
_STEP = flags.DEFINE_integer('step', None, 'the checkpoint to export; default: the latest')
_OUT = flags.DEFINE_string('out', None, 'output directory; default: WORKDIR/export/<format>_<step>')


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


def export_run(workdir: str, format: str, step: int | None = None, out: str | None = None) -> str:
  """Writes the trainables of checkpoint `step` (default: the latest) of the run in `workdir`
  in `format`; returns the directory written."""
  if format not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise CheckpointError(f'{workdir} has no checkpoints folder: no run saved a checkpoint there')
  checkpoints = Checkpoints(directory, read_only=True)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{directory} holds no complete checkpoint')
  config = checkpoints.restore_config(step)
  methods = methods_of(config)
  model_config = load_config(config['model'])
  try:
    peft = checkpoints.restore(step, abstract_train_state(config, methods, model_config)).peft
  finally:
    checkpoints.close()
  out = out or os.path.join(workdir, 'export', f'{format}_{step}')
  if format == 'merged':
    base_config, params = load_model(config['model'])
    save_merged(out, Llama(base_config, peft=methods), {'params': params, 'peft': peft})
  else:
    save_adapter(out, methods, peft, model_config, format=format,
                 base_model_name_or_path=config['model'])
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  try:
    out = export_run(_WORKDIR.value, _FORMAT.value, _STEP.value, _OUT.value)
  except (ValueError, OSError) as err:  # bad input: one clear line, no traceback
    sys.exit(f'error: {err}')
  print(f'wrote {out}')


if __name__ == '__main__':
  cli.run(main)
