"""Adapter files from a run's checkpoint.

    python -m additive_jax.export --workdir=DIR --format=aj|hf_peft|adapterhub|merged [--step=N] [--out=DIR]

Reads the run's config from its latest checkpoint (or `--step`) and restores the
trainable partition onto one device, whatever mesh trained it
(`train.restore.restore_run`: no base weight is read, except for `merged`, which
folds (IA)³ / LoRA into the base).
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

from additive_jax import cli
from additive_jax.model.llama import Llama
from additive_jax.model.load import load_config, load_model
from additive_jax.peft.files import save_adapter, save_merged
from additive_jax.train.restore import restore_run

FORMATS = ('aj', 'hf_peft', 'adapterhub', 'merged')

_WORKDIR = flags.DEFINE_string('workdir', None, "the run's workdir (holding checkpoints/)",
                               required=True)
_FORMAT = flags.DEFINE_enum('format', None, FORMATS, 'the adapter format, or a merged HF checkpoint',
                            required=True)
_STEP = flags.DEFINE_integer('step', None, 'the checkpoint to export; default: the latest')
_OUT = flags.DEFINE_string('out', None, 'output directory; default: WORKDIR/export/<format>_<step>')


def export_run(workdir: str, format: str, step: int | None = None, out: str | None = None) -> str:
  """Writes the trainables of checkpoint `step` (default: the latest) of the run in `workdir`
  in `format`; returns the directory written."""
  if format not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
  run = restore_run(workdir, 'latest' if step is None else step)
  out = out or os.path.join(workdir, 'export', f'{format}_{run.step}')
  if format == 'merged':
    base_config, params = load_model(run.config['model'])
    save_merged(out, Llama(base_config, peft=run.methods), {'params': params, 'peft': run.peft})
  else:
    save_adapter(out, run.methods, run.peft, load_config(run.config['model']), format=format,
                 base_model_name_or_path=run.config['model'])
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
