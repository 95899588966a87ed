"""A folder our commands write is complete, or it is refused as absent.

    with writing('gs://bucket/run/adapter') as out:   # any epath
      ...write files into out...
    check_complete('gs://bucket/run/adapter')          # raises AdapterFileError if half-written

A rename is not atomic on an object store (a folder is copied and deleted object by object),
so a reader could see half a folder. Instead the writer marks the folder first (`WRITING`),
replaces what was there, writes its files, then writes `COMPLETE.json` last, listing every
file and its size, and drops `WRITING`. A reader refuses a folder that holds `WRITING` and no
`COMPLETE.json`, or whose files differ from the listing. A folder with neither marker was not
written by these commands (HF PEFT, AdapterHub, or an export older than the markers) and is
read as it is.
"""

from __future__ import annotations

import contextlib
import json

from etils import epath

from additive_jax.peft.files.file_io import AdapterFileError

COMPLETE = 'COMPLETE.json'
WRITING = 'WRITING'
MARKERS = (COMPLETE, WRITING)


@contextlib.contextmanager
def writing(directory: str):
  """Yields `directory` (an epath) emptied and marked as being written; on a clean exit,
  `COMPLETE.json` is written last. An exception leaves it marked, so readers refuse it."""
  out = epath.Path(directory)
  if out.is_file():
    raise ValueError(f'{out} is a file; give a directory')
  out.mkdir(parents=True, exist_ok=True)
  (out / WRITING).write_text('a write of this folder has not finished\n', encoding='utf-8')
  (out / COMPLETE).unlink(missing_ok=True)
  for old in out.iterdir():  # an earlier write of the same folder: replaced whole
    if old.name != WRITING:
      old.rmtree() if old.is_dir() else old.unlink()
  yield out
  files = listing(out)
  (out / COMPLETE).write_text(json.dumps({'files': files}, indent=2) + '\n', encoding='utf-8')
  (out / WRITING).unlink()


def listing(directory: epath.Path) -> dict[str, int]:
  """file name -> bytes of the files `directory` holds, the markers left out."""
  return {path.name: path.stat().length for path in sorted(directory.iterdir())
          if path.name not in MARKERS}


def check_complete(directory: str) -> None:
  """Raises AdapterFileError naming `directory` if a write of it did not finish."""
  path = epath.Path(directory)
  if not (path / COMPLETE).exists():
    if (path / WRITING).exists():
      raise AdapterFileError(f'{directory} is half-written: a write of it did not finish (it has '
                             f'{WRITING} and no {COMPLETE}); write it again')
    return
  listed = json.loads((path / COMPLETE).read_text(encoding='utf-8'))['files']
  found = listing(path)
  if found != listed:
    differ = sorted(name for name in set(found) | set(listed)
                    if found.get(name) != listed.get(name))
    raise AdapterFileError(f'{directory} is incomplete: {", ".join(differ)} differ from its '
                           f'{COMPLETE}; write it again')
