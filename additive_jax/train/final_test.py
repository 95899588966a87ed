"""The end of a run: the test metric of the checkpoint `config.test_checkpoint` names, each test
row's outcome, and the tested trainables as an adapter, all written into the workdir.

    test_hits.json   {'metric', 'source', 'split', 'limit', 'step', 'hits': [1, 0, ...]} in the order of
                     the split's fixed subset: what a paired comparison of two runs on the
                     same rows (experiments/report.py's bootstrap) reads
    adapter/         the trainables tested, in additive_jax's adapter format (`aj.peft.
                     load_adapter`), its COMPLETE.json written last (peft/files/complete.py);
                     its size is the summary's `adapter_bytes`

`last` tests the state the run ends with; `best` restores the checkpoint kept as best by
the eval metric (`config.eval_metric` on its fixed subset of `data.eval_split`, else the eval
loss), so that the test split plays no part in choosing it.
"""

from __future__ import annotations

from etils import epath
import jax
from jax.experimental import multihost_utils

from additive_jax.peft.files import save_adapter
from additive_jax.peft.files.complete import listing, writing
from additive_jax.peft.files.file_io import write_json
from additive_jax.train.checkpoint import Checkpoints, abstract_like
from additive_jax.train.eval_loss import task_metric
from additive_jax.train.workdir import RunFolder


def tested_state(checkpoints: Checkpoints, state, config):
  """(state, its step): the run's last, or the best checkpoint's restored."""
  if config.test_checkpoint == 'last':
    return state, int(state.step)
  checkpoints.wait()
  best = checkpoints.best_step()
  if best is None:
    raise ValueError(f'config.test_checkpoint=best, but {checkpoints.directory} has no checkpoint '
                     'ranked by the eval metric (config.keep_best is 0, or none was evaluated)')
  return checkpoints.restore(best, abstract_like(state)), best


def test_and_keep(run, state, step: int, config, folder: RunFolder) -> dict:
  """{metric}_after, test_step and adapter_bytes for the summary; the files above written."""
  metric = config.test_metric
  result = task_metric(run, state, config, metric, config.test_split, config.test_limit,
                       hits=True)
  peft = multihost_utils.process_allgather(state.peft, tiled=True)  # every process's leaves
  out = {f'{metric}_after': result[metric], 'test_step': step}
  if jax.process_index() == 0:
    write_json(str(folder.test_hits), {
        'metric': metric, 'source': config.data.source.name, 'split': config.test_split, 'limit': config.test_limit, 'step': step,
        'hits': result['hits']})
    out['adapter_bytes'] = _save_adapter(folder.adapter, run, peft, config.model)
  return out


def _save_adapter(out: epath.Path, run, peft, base_model: str) -> int:
  """Writes the adapter, marked complete last (an earlier one replaced); its bytes."""
  with writing(str(out)) as folder:
    save_adapter(str(folder), run.model.peft, peft, run.model.config, format='aj',
                 base_model_name_or_path=base_model)
  return sum(listing(out).values())
