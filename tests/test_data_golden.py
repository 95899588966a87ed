"""Golden rows: real examples of each data set, through TFDS, the template, the tokenizer,
the shift and the mask, against ids written out by hand.

The expected ids are assembled from the SmolLM2 ids of each word-level piece
(listed in the comments), following the template: for an example whose ids are
x_0..x_n, tokens are x_0..x_{n-1}, targets x_1..x_n, and the loss mask is 1
where the target belongs to the response (its final EOS, id 2, included).
"""

import grain
import numpy as np

from additive_jax.data.config import data_config
from additive_jax.data.pipeline import make_eval_batches
from additive_jax.data import packing, tfds_builders
from additive_jax.data.encode import example_arrays
from data_helpers import pair

EOS = 2  # <|im_end|>, also SmolLM2's padding token: masks never look at ids

# 'Review' ':' ' it' " '" 's' ' a' ' charming' ' and' ' often' ' affecting' ' journey' ' .'
# '\n' 'Sent' 'iment' ':'  — SST-2 test line 2, "it 's a charming and often affecting journey . "
SST2_LINE2_PROMPT = [21465, 42, 357, 637, 99, 253, 26597, 284, 1129, 7053, 3444, 1673,
                     198, 35658, 2572, 42]
POSITIVE = 2731  # ' positive' (label 1)
# 'Review' ':' ' unfl|in|ch|ing|ly' ' bleak' ' and' ' desperate' '\n' 'Sent' 'iment' ':'
# — SST-2 test line 3, "unflinchingly bleak and desperate "
SST2_LINE3_PROMPT = [21465, 42, 551, 2354, 254, 4270, 318, 38618, 284, 22415, 198, 35658, 2572, 42]
NEGATIVE = 3524  # ' negative' (label 0)
# 'GRE|M|IO' ':' '\n' 'Am|en' ',' ' say' ' we' ':' ' we' ' will' ' be' ' witnesses' '.'
# — Tiny Shakespeare line 36,015, the third paragraph of the held-out 10%
GREMIO = [55, 38511, 8772, 42, 198, 49, 4065, 28, 1643, 392, 42, 392, 523, 325, 18088, 30]


def eval_rows(tokenizer, source, split, seq_len, template='plain'):
  config = data_config()
  config.source.name, config.eval_split, config.template = source, split, template
  batches, _ = make_eval_batches(config, tokenizer, batch_size=1, seq_len=seq_len)
  return batches


def assert_row(row, tokens, targets, loss_mask, seq_len):
  pad = seq_len - len(tokens)
  np.testing.assert_array_equal(row['tokens'], tokens + [0] * pad)
  np.testing.assert_array_equal(row['targets'], targets + [0] * pad)
  np.testing.assert_array_equal(row['loss_mask'], loss_mask + [0] * pad)
  np.testing.assert_array_equal(row['positions'], np.arange(seq_len))
  np.testing.assert_array_equal(row['segment_ids'], [1] * len(tokens) + [0] * pad)
  assert row['tokens'].dtype == row['targets'].dtype == np.int32
  assert row['loss_mask'].dtype == np.float32


def test_sst2_plain_rows(smollm2_tokenizer):
  batches = eval_rows(smollm2_tokenizer, 'sst2', 'test', seq_len=20)
  first, second = batches[0], batches[1]
  assert first['tokens'].shape == (1, 20)
  # 16 prompt ids + ' positive' + EOS = 18 ids: 17 positions, the last two targets learned
  assert_row({k: v[0] for k, v in first.items()},
             tokens=SST2_LINE2_PROMPT + [POSITIVE],
             targets=SST2_LINE2_PROMPT[1:] + [POSITIVE, EOS],
             loss_mask=[0] * 15 + [1, 1], seq_len=20)
  assert_row({k: v[0] for k, v in second.items()},
             tokens=SST2_LINE3_PROMPT + [NEGATIVE],
             targets=SST2_LINE3_PROMPT[1:] + [NEGATIVE, EOS],
             loss_mask=[0] * 13 + [1, 1], seq_len=20)


def test_sst2_chat_row(smollm2_tokenizer):
  # <|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face
  # <|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n | {response}<|im_end|>
  # 'system' '\n' 'You' ' are' ' a' ' helpful' ' AI' ' assistant' ' named' ' Sm|ol|LM' ','
  # ' trained' ' by' ' H|ugging' ' Face'
  system = [9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182]
  user, assistant = [4093, 198], [520, 9531, 198]  # 'user' '\n', 'ass|istant' '\n'
  prompt = ([1] + system + [EOS, 198] + [1] + user + SST2_LINE3_PROMPT + [EOS, 198] +
            [1] + assistant)
  assert len(prompt) == 44
  row = {k: v[0] for k, v in eval_rows(smollm2_tokenizer, 'sst2', 'test', 48, 'chat')[1].items()}
  # the response is ' negative' and the turn's <|im_end|>; the newline after it is not a target
  assert_row(row, tokens=prompt + [NEGATIVE], targets=prompt[1:] + [NEGATIVE, EOS],
             loss_mask=[0] * 43 + [1, 1], seq_len=48)


def test_gsm8k_plain_row(smollm2_tokenizer):
  # test.jsonl line 306: "John arm wrestles 20 people.  He beats 80%.  How many people did he
  # lose to?" → "He beats 20*.8=<<20*.8=16>>16 people\nSo he loses to 20-16=<<20-16=4>>4
  # people\n#### 4". Digits are single tokens ('2' 34, '0' 32, '1' 33, '4' 36, '6' 38, '8' 40);
  # a double space is ' ' (216) before the next word's own ' He' / ' How'.
  prompt = [17872, 42,                                   # 'Question' ':'
            2322, 5026, 22598, 735, 216, 34, 32, 701, 30,  # ' John' ' arm' ' wrest|les' ' ' 2 0 ' people' '.'
            216, 909, 20849, 216, 40, 32, 8006,            # ' ' ' He' ' beats' ' ' 8 0 '%.'
            216, 1073, 800, 701, 1250, 384, 5946, 288, 47,  # ' ' ' How' ' many' ... ' to' '?'
            198, 21350, 42]                                # '\n' 'Answer' ':'
  response = [909, 20849, 216, 34, 32, 13773, 40,          # ' He' ' beats' ' ' 2 0 '*.' 8
              45, 33691, 34, 32, 13773, 40, 45, 33, 38,    # '=' '<<' 2 0 '*.' 8 '=' 1 6
              7791, 33, 38, 701, 198,                      # '>>' 1 6 ' people' '\n'
              2931, 384, 18691, 288, 216, 34, 32, 29, 33, 38,  # 'So' ' he' ' loses' ' to' ' ' 2 0 '-' 1 6
              45, 33691, 34, 32, 29, 33, 38, 45, 36,       # '=' '<<' 2 0 '-' 1 6 '=' 4
              7791, 36, 701, 198, 1229, 216, 36, EOS]      # '>>' 4 ' people' '\n' '####' ' ' 4, EOS
  row = {k: v[0] for k, v in eval_rows(smollm2_tokenizer, 'gsm8k', 'test', 80)[305].items()}
  ids = prompt + response
  assert_row(row, tokens=ids[:-1], targets=ids[1:],
             loss_mask=[0] * (len(prompt) - 1) + [1] * len(response), seq_len=80)


def test_tiny_shakespeare_row_is_all_response(smollm2_tokenizer):
  row = {k: v[0] for k, v in eval_rows(smollm2_tokenizer, 'tinyshakespeare', 'test', 24)[2].items()}
  # empty prompt: the first id is only an input; every target, EOS included, is learned
  assert_row(row, tokens=GREMIO, targets=GREMIO[1:] + [EOS], loss_mask=[1] * 16, seq_len=24)


def test_packed_rows_restart_positions_per_segment():
  line2 = example_arrays(pair(SST2_LINE2_PROMPT, [POSITIVE, EOS]))   # 17 positions
  line3 = example_arrays(pair(SST2_LINE3_PROMPT, [NEGATIVE, EOS]))   # 15
  gremio = example_arrays(pair([], GREMIO + [EOS]))                   # 16
  stream = grain.MapDataset.source([line2, line3, gremio]).to_iter_dataset()
  # first fit into 2 rows of 40: line2 + line3 fill 32 of row 0; gremio does not fit there
  first, second = list(packing.pack(stream, seq_len=40, rows=2))
  np.testing.assert_array_equal(
      first['tokens'], SST2_LINE2_PROMPT + [POSITIVE] + SST2_LINE3_PROMPT + [NEGATIVE] + [0] * 8)
  np.testing.assert_array_equal(
      first['targets'],
      SST2_LINE2_PROMPT[1:] + [POSITIVE, EOS] + SST2_LINE3_PROMPT[1:] + [NEGATIVE, EOS] + [0] * 8)
  np.testing.assert_array_equal(first['loss_mask'],
                                [0] * 15 + [1, 1] + [0] * 13 + [1, 1] + [0] * 8)
  np.testing.assert_array_equal(first['segment_ids'], [1] * 17 + [2] * 15 + [0] * 8)
  np.testing.assert_array_equal(first['positions'],
                                list(range(17)) + list(range(15)) + [0] * 8)
  np.testing.assert_array_equal(second['tokens'], GREMIO + [0] * 24)
  np.testing.assert_array_equal(second['targets'], GREMIO[1:] + [EOS] + [0] * 24)
  np.testing.assert_array_equal(second['loss_mask'], [1] * 16 + [0] * 24)
  np.testing.assert_array_equal(second['segment_ids'], [1] * 16 + [0] * 24)
  np.testing.assert_array_equal(second['positions'], list(range(16)) + [0] * 24)
  assert {k: v.dtype for k, v in first.items()} == {
      'tokens': np.int32, 'targets': np.int32, 'loss_mask': np.float32, 'positions': np.int32,
      'segment_ids': np.int32}


def test_tfds_records_are_the_file_rows():
  """The prepared records keep the file order and point back to their lines."""
  source = tfds_builders.data_source('sst2', 'test', data_config().data_dir)
  assert len(source) == 872
  assert source[0] == {
      'prompt': b"Review: it 's a charming and often affecting journey .\nSentiment:",
      'response': b' positive', 'line': 2, 'column': 0}
  assert source[871]['line'] == 873
