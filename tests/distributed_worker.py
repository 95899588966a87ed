"""One process of a two-process `jax.distributed` training run on CPU (run by test_trainer_cli.py).

    python tests/distributed_worker.py CHECKPOINT PORT PROCESS_ID OUTPUT_JSON

Each process holds one CPU device and feeds its own rows of the global batch;
the gradient is reduced across processes over gloo. Writes the per-step losses
and every trainable leaf as JSON, for the test to compare between processes and
with a single-process run of the same global batches.
"""

import json
import sys

import jax

jax.config.update('jax_cpu_collectives_implementation', 'gloo')
checkpoint, port, process_id, output = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
assert jax.device_count() == 2  # one CPU device in each process

from additive_jax.train.mesh import make_mesh  # noqa: E402
from sharded_helpers import flat, train  # noqa: E402  (the same run as the 8-device test)

losses, state, *_ = train(checkpoint, make_mesh((-1, 1, 1)),
                          local_rows=slice(4 * process_id, 4 * process_id + 4))
leaves = {path: leaf.tolist() for path, leaf in flat(state.peft).items()}
with open(output, 'w', encoding='utf-8') as f:
  json.dump({'process': jax.process_index(), 'losses': losses, 'peft': leaves}, f)
