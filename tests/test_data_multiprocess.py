"""Two real JAX processes (`jax.distributed` on CPU, one machine): each trains on its own rows of
the one global stream, which are the rows one process would give that batch (so a run resumes
with another process count); evaluation shards cover every example once and give both
processes the same number of batches.

Both processes start from an empty cache, so they also prepare the TFDS data at the
same time: the second to finish must accept the first one's data.
"""

import collections
import json
import os
import subprocess
import sys

from additive_jax.data.pipeline import make_eval_batches, make_train_iterator
from conftest import free_port
from data_helpers import examples_of, shakespeare_test_config

_PROCESS = r'''
import json, sys
import jax
jax.config.update('jax_platforms', 'cpu')
port, process_id, tests_dir, tokenizer_dir, cache_dir, out = sys.argv[1:]
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=int(process_id))
import transformers
sys.path.insert(0, tests_dir)
from data_helpers import examples_of, shakespeare_test_config
from additive_jax.data.pipeline import make_eval_batches, make_train_iterator

tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
shard = dict(seq_len=256, process_index=jax.process_index(), process_count=jax.process_count(),
             cache_dir=cache_dir)
train, report = make_train_iterator(shakespeare_test_config(), tokenizer, batch_size=2, seed=0,
                                         **shard)
evaluation, _ = make_eval_batches(shakespeare_test_config(), tokenizer, batch_size=8, **shard)
with open(out, 'w') as f:
  train = list(train)
  json.dump({'train': examples_of(*train), 'eval': examples_of(*evaluation),
             'train_rows': [{k: b[k].tolist() for k in ('tokens', 'segment_ids', 'loss_mask')}
                            for b in train],
             'eval_batches': len(evaluation), 'census': report.kept + report.truncated}, f)
jax.distributed.shutdown()
'''


def counts(rows):
  return collections.Counter(map(tuple, rows))  # JSON gave lists


def test_two_processes_read_their_rows_of_one_global_stream(smollm2_tokenizer, tmp_path):
  smollm2_tokenizer.save_pretrained(tmp_path / 'tokenizer')
  cache_dir, port = tmp_path / 'cache', free_port()
  outputs = [tmp_path / f'process_{i}.json' for i in range(2)]
  arguments = [os.path.dirname(__file__), str(tmp_path / 'tokenizer'), str(cache_dir)]
  processes = [subprocess.Popen([sys.executable, '-c', _PROCESS, str(port), str(i), *arguments,
                                 str(outputs[i])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
  for process in processes:
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 0, log[-3000:]
  first, second = (json.loads(path.read_text()) for path in outputs)

  everything, report = make_eval_batches(shakespeare_test_config(), smollm2_tokenizer,
                                              batch_size=8, seq_len=256, cache_dir=str(cache_dir))
  expected = collections.Counter(examples_of(*everything))
  total = sum(expected.values())
  assert total == report.kept + report.truncated == 842
  # Each process censuses the whole split; row p of every global batch is process p's, exactly
  # the row one process reading the whole batch gets.
  assert first['census'] == second['census'] == total
  alone, _ = make_train_iterator(shakespeare_test_config(), smollm2_tokenizer, batch_size=2,
                                 seq_len=256, seed=0, cache_dir=str(cache_dir))
  alone = list(alone)
  assert len(alone) == len(first['train_rows']) == len(second['train_rows']) > 100
  for batch, mine, theirs in zip(alone, first['train_rows'], second['train_rows']):
    for name in ('tokens', 'segment_ids', 'loss_mask'):
      assert batch[name][:1].tolist() == mine[name] and batch[name][1:].tolist() == theirs[name]
  # together they read every example once (but for a last batch the packer could not fill)
  together = counts(first['train']) + counts(second['train'])
  assert not together - expected and sum((expected - together).values()) <= 8
  assert first['eval_batches'] == second['eval_batches'] == 106  # 421 rows each, 4 a batch
  assert counts(first['eval']) + counts(second['eval']) == expected
