"""Adapter files from a run's checkpoint.

    python -m additive_jax.export --workdir=DIR --format=aj|hf_peft|adapterhub|merged \
        [--checkpoint=latest|best|STEP] [--out=DIR]

Reads the run's config from the checkpoint `--checkpoint` names (`train.workdir`: the
latest, the one the trainer kept as best, or a step) and restores the
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

Nothing is half-written. Whether the format can hold the run's methods is known
from its config alone: the files are first written from zeros of the trainables'
shapes into a scratch folder (adapter files are small; a merged checkpoint is
checked by the methods alone), so a refusal comes before any array is restored.
The export is written into `--out` marked as being written, with a listing of its files
written last (`peft/files/complete.py`: a rename is not atomic on an object store), so a
reader refuses a half-written export in one line; a rerun replaces it whole.
"""

from additive_jax import command  # first: it quiets what later imports print
import sys
import tempfile

from etils import epath
import jax
import numpy as np

from absl import app, flags

from additive_jax.model.llama import Llama
from additive_jax.model.load import load_config, load_model
from additive_jax.peft.files import AdapterFileError, save_adapter, save_merged
from additive_jax.peft.files.complete import writing
from additive_jax.train.restore import abstract_train_state, restore_run
from additive_jax.train.workdir import RunFolder

FORMATS = ('aj', 'hf_peft', 'adapterhub', 'merged')

_WORKDIR = flags.DEFINE_string('workdir', None, "the run's workdir (holding checkpoints/)",
                               required=True)
_FORMAT = flags.DEFINE_enum('format', None, FORMATS, 'the adapter format, or a merged HF checkpoint',
                            required=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest',
                                  "the run's checkpoint to export: latest, best or a step")
_OUT = flags.DEFINE_string('out', None, 'output directory; default: WORKDIR/export/<format>_<step>')


def export_run(workdir: str, format: str, checkpoint: str | int | None = 'latest',
               out: str | None = None) -> str:
  """Writes the trainables of the run in `workdir` at `checkpoint` ('latest', 'best' or a step)
  in `format`; returns the directory written."""
  if format not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
  saved = restore_run(workdir, checkpoint, trainables=False)
  model_config = load_config(saved.config['model'])
  out = epath.Path(out or RunFolder(workdir).export(format, saved.step))
  if out.is_file():
    raise ValueError(f'--out={out} is a file; give a directory')
  _check_writable(format, saved, model_config)
  run = restore_run(workdir, saved.step)
  with writing(str(out)) as folder:
    _write(folder, format, run, model_config)
  return str(out)


def _write(path: epath.Path, format: str, run, model_config) -> None:
  directory = str(path)
  if format == 'merged':
    base_config, params = load_model(run.config['model'])
    save_merged(directory, Llama(base_config, peft=run.methods),
                {'params': params, 'peft': run.peft})
  else:
    save_adapter(directory, run.methods, run.peft, model_config, format=format,
                 base_model_name_or_path=run.config['model'])


def _check_writable(format: str, saved, model_config) -> None:
  """Raises the error writing would, before any array is read: the format's own writer run on
  zeros of the trainables' shapes, into a scratch folder that is then removed."""
  if format == 'merged':
    quant = saved.config.get('base_quant', 'none')
    if quant != 'none':  # PEFT #2321: a merge into a widened copy, silently, is not what trained
      raise AdapterFileError(f"this run trained over a base in blocks (base_quant='{quant}'): a "
                             'merged checkpoint would fold the adapter into weights it was not '
                             'trained over (widened, or rounded again); export the adapter '
                             '(--format=aj, hf_peft or adapterhub) and load it over the same base')
    unmergeable = [m.call_string() for m in saved.methods if not m.mergeable]
    if unmergeable:
      raise AdapterFileError(f'{", ".join(unmergeable)} cannot be folded into the base weights; a '
                       'merged checkpoint holds (IA)³ and LoRA only: export them with '
                       '--format=aj (or hf_peft, adapterhub)')
    return
  abstract = abstract_train_state(saved.config, saved.methods, model_config).peft
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  with tempfile.TemporaryDirectory() as scratch:
    save_adapter(scratch, saved.methods, zeros, model_config, format=format,
                 base_model_name_or_path=saved.config['model'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  try:
    out = export_run(_WORKDIR.value, _FORMAT.value, _CHECKPOINT.value, _OUT.value)
  except (ValueError, OSError) as err:  # bad input: one clear line, no traceback
    sys.exit(f'error: {err}')
  print(f'wrote {out}')


if __name__ == '__main__':
  command.run(main)
