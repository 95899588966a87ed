"""Chat data with turns: a conversation field rendered by SmolLM2's own chat template, the
loss on every assistant turn's content and its <|im_end|> and on nothing else; truncation and
packing of conversations; a bad conversation named by file and line."""

import json

import numpy as np
import pytest

from additive_jax.data.config import data_config
from additive_jax.data.encode import example_arrays, fit
from additive_jax.data.pipeline import make_eval_batches, make_train_iterator
from additive_jax.data.sources import read_rows, source_spec
from additive_jax.data.templates import SegmentEncoder
from data_helpers import examples_of

IM_START, IM_END, NEWLINE = 1, 2, 198  # <|im_start|>, <|im_end|> (SmolLM2's EOS), '\n'
HEADER = [IM_START, 520, 9531, NEWLINE]  # <|im_start|> 'ass|istant' '\n'
CONVERSATION = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': 'Bye'},
                {'role': 'assistant', 'content': 'Goodbye.'}]
# <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
OPENING = ([IM_START, 9690, NEWLINE, 6077, 5453, 30, IM_END, NEWLINE] +  # 'system' '\n' 'Be' ' brief' '.'
           [IM_START, 4093, NEWLINE, 26843, IM_END, NEWLINE] + HEADER)  # 'user' '\n' 'Hi'
HELLO = [19556, 17, IM_END]                                               # 'Hello' '!'
# \n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n
SECOND_USER = [NEWLINE, IM_START, 4093, NEWLINE, 3087, 85, IM_END, NEWLINE] + HEADER  # 'By|e'
GOODBYE = [14229, 25257, 30, IM_END]                                      # 'Good' 'bye' '.'


def write_chat(directory, rows):
  (directory / 'chat.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))


def chat_config(directory, **overrides):
  config = data_config()
  source = config.source
  source.name, source.format, source.messages = 'chat', 'jsonl', 'messages'
  source.files.train = source.files.test = 'chat.jsonl'
  config.update({'data_dir': str(directory), 'eval_split': 'test', 'template': 'chat', **overrides})
  return config


def test_each_assistant_turn_and_its_end_of_turn_token_is_learned_and_nothing_else(
    smollm2_tokenizer, tmp_path):
  write_chat(tmp_path, [{'id': 7, 'messages': CONVERSATION}])
  batches, report = make_eval_batches(chat_config(tmp_path), smollm2_tokenizer, batch_size=1,
                                      seq_len=40, cache_dir=str(tmp_path / 'cache'))
  assert report.kept == 1
  row = {key: value[0] for key, value in batches[0].items()}
  ids = OPENING + HELLO + SECOND_USER + GOODBYE  # 18 + 3 + 12 + 4 = 37 ids, 36 positions
  np.testing.assert_array_equal(row['tokens'], ids[:-1] + [0] * 4)
  np.testing.assert_array_equal(row['targets'], ids[1:] + [0] * 4)
  # targets 17..19 are 'Hello' '!' <|im_end|>, targets 32..35 'Good' 'bye' '.' <|im_end|>
  np.testing.assert_array_equal(row['loss_mask'],
                                [0] * 17 + [1] * 3 + [0] * 12 + [1] * 4 + [0] * 4)
  np.testing.assert_array_equal(row['segment_ids'], [1] * 36 + [0] * 4)
  # the segments, tokenized one by one, are the tokens of the whole rendering
  rendered = smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
  assert rendered.endswith('<|im_end|>\n')
  assert smollm2_tokenizer.backend_tokenizer.encode(rendered[:-1]).ids == ids


def test_the_conversation_rows_keep_their_fields(tmp_path):
  write_chat(tmp_path, [{'id': 7, 'messages': CONVERSATION}])
  [row] = read_rows(source_spec(chat_config(tmp_path).source), str(tmp_path), 'test')
  assert (row.line, row.fields['id'], list(row.messages)) == (1, '7', CONVERSATION)


def test_a_conversation_without_a_system_message_gets_the_templates_own(smollm2_tokenizer):
  encoder = SegmentEncoder(smollm2_tokenizer, 'chat')
  [segments] = encoder([{'messages': CONVERSATION[1:3]}])
  (opening, is_target), hello = segments
  assert not is_target and hello == (HELLO, True)
  assert opening[:2] == [IM_START, 9690] and opening[-10:] == OPENING[-10:]
  assert len(opening) > 20  # 'You are a helpful AI assistant named SmolLM, ...'


def test_truncation_keeps_the_last_turn_and_cuts_the_conversation_from_the_left(
    smollm2_tokenizer):
  [segments] = SegmentEncoder(smollm2_tokenizer, 'chat')([{'messages': CONVERSATION}])
  fitted = fit(segments, 11, 'truncate')  # 7 ids of context before the 4 of the last turn
  assert fitted == [([], False), ([], True), (SECOND_USER[-7:], False), (GOODBYE, True)]
  example = example_arrays(fitted)
  np.testing.assert_array_equal(example['loss_mask'], [0] * 6 + [1] * 4)
  assert fit(segments, 11, 'drop') is None


def test_conversations_pack_and_train(smollm2_tokenizer, tmp_path):
  short = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
  write_chat(tmp_path, [{'messages': CONVERSATION}, {'messages': short}] * 2)
  config = chat_config(tmp_path, num_epochs=1)
  iterator, report = make_train_iterator(config, smollm2_tokenizer, batch_size=1, seq_len=128,
                                         seed=0, cache_dir=str(tmp_path / 'cache'))
  rows = list(iterator)
  assert report.kept == 4 and len(examples_of(*rows)) == 4
  assert max(row['segment_ids'].max() for row in rows) > 1  # several conversations in a row
  learned = sum(float(row['loss_mask'].sum()) for row in rows)
  assert learned == 2 * (len(HELLO) + len(GOODBYE)) + 2 * len(HELLO)


@pytest.mark.parametrize('messages, message', [
    ([{'role': 'user', 'content': 'Hi'}, {'role': 'tool', 'content': '{}'}],
     r"chat.jsonl:2: field messages: message 2 has role 'tool', not one of system, user, "
     r'assistant'),
    ([{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}],
     r'chat.jsonl:2: field messages: no assistant turn \(roles: system, user\)'),
    ([{'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': 'Hi'}],
     r'chat.jsonl:2: field messages: message 1 is an assistant turn with no user turn before it'),
    ([{'role': 'user', 'content': 'Hi'}, {'role': 'system', 'content': 'Be brief.'},
      {'role': 'assistant', 'content': 'Hello!'}],
     r'chat.jsonl:2: field messages: message 2 is a system message; only the first may be'),
    ([{'role': 'user', 'text': 'Hi'}], r'chat.jsonl:2: field messages: message 1 is not a'),
    ('Hi', r'chat.jsonl:2: field messages must be a list of \{"role", "content"\} messages'),
])
def test_a_bad_conversation_is_named_by_file_and_line(tmp_path, messages, message):
  write_chat(tmp_path, [{'messages': CONVERSATION}, {'messages': messages}])
  with pytest.raises(ValueError, match=message):
    list(read_rows(source_spec(chat_config(tmp_path).source), str(tmp_path), 'test'))


def test_a_row_without_the_conversation_field_is_named(tmp_path):
  write_chat(tmp_path, [{'turns': CONVERSATION}])
  with pytest.raises(ValueError, match=r'chat.jsonl:1: missing field messages '
                                       r'\(config.data.source.messages; the row has turns\)'):
    list(read_rows(source_spec(chat_config(tmp_path).source), str(tmp_path), 'test'))


def test_conversations_need_the_chat_template(smollm2_tokenizer, tmp_path):
  write_chat(tmp_path, [{'messages': CONVERSATION}])
  with pytest.raises(ValueError, match=r"config.data.template='plain': the rows of chat are "
                                       r"conversations .* set config.data.template='chat'"):
    make_eval_batches(chat_config(tmp_path, template='plain'), smollm2_tokenizer, batch_size=1,
                      seq_len=40, cache_dir=str(tmp_path / 'cache'))
