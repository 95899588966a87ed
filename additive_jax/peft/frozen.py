"""An adapter a method holds frozen beside what it trains, read from an adapter file directory.

    method, tree = load_frozen('out/sst2_adapter', config)   # ours or AdapterHub's, one method

AdapterFusion (peft/fusion.py) fuses adapters trained before, and never trains them:
each is one method's adapter file (`aj.peft.save_adapter`, in our format or
AdapterHub's). A finished run's folder is read by the trainer instead
(`train/frozen_sources.py`, through `aj.restore_run`), since reading a checkpoint is
the train layer's business; here it is named as such and refused, in one line.

A method reads its frozen adapters in `init_leaves`, which the trainer traces under
`jax.jit` (train/model_state.py); the arrays are read at trace time all the same
(`jax.ensure_compile_time_eval`) and enter that one-off program as constants.
"""

from __future__ import annotations

from etils import epath
import jax

from additive_jax.peft.files.file_io import AdapterFileError
from additive_jax.peft.files.formats import load_adapter


def load_frozen(path: str, config, allow_pickle: bool = False):
  """(method, its tree) of the one-method adapter in `path`, checked against the base
  `config`; an AdapterFileError naming `path` for anything else."""
  folder = epath.Path(path)
  if (folder / 'checkpoints').is_dir():
    raise AdapterFileError(f'{path} is a run folder, not an adapter file directory: a run '
                           'folder is read by the trainer (a config entry lists it), or export '
                           'its adapter first (python -m additive_jax.export --workdir=...)')
  with jax.ensure_compile_time_eval():  # concrete arrays, also inside a traced init
    methods, peft = load_adapter(str(path), config, allow_pickle=allow_pickle)
  if len(methods) != 1:
    raise AdapterFileError(f'{path} holds {", ".join(m.call_string() for m in methods)}: a '
                           'frozen adapter is one method')
  return methods[0], peft[methods[0].key]
