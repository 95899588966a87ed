"""Shared by the data-pipeline tests (and the processes they start): the examples a stream
yields, a (prompt, response) pair as segments, and the Tiny Shakespeare config the
multi-process test reads."""

from additive_jax.data.config import data_config


def examples_of(*batches):
  """The ids (x_0..x_n) of every segment of every row of the batches, empty rows left out."""
  found = []
  for batch in batches:
    for tokens, targets, segments in zip(batch['tokens'], batch['targets'], batch['segment_ids']):
      for segment in range(1, segments.max() + 1):
        where = segments == segment
        found.append(tuple(tokens[where].tolist()) + (int(targets[where][-1]),))
  return found


def pair(prompt_ids, response_ids):
  """The segments of a (prompt, response) example: the response is the target."""
  return [(prompt_ids, False), (response_ids, True)]


def shakespeare_test_config():
  config = data_config()
  config.source.name, config.split, config.eval_split = 'tinyshakespeare', 'test', 'test'
  config.packing, config.num_epochs = False, 1
  return config
