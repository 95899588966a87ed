"""The built-in sources: declarations like any other, of the files in ../shared/data.

`config.data.source.name` set to one of these fills every key of the declaration
left unset; a key that is set overrides it (`--config.data.source.prompt=...`).

* SST-2: `Review: {sentence}\\nSentiment:` → ` negative` / ` positive` (label 0 / 1);
  splits train, dev, test (test is GLUE's validation set).
* GSM8K: `Question: {question}\\nAnswer:` → ` {answer}`; splits train, test.
* TREC (question types, 6 coarse classes): `Question: {question}\nType:` → one label
  word per class (` abbreviation`, ` description`, ` entity`, ` person`, ` location`,
  ` number`); splits train, test, and dev held out as the last 10% of train (TREC has none).
* Tiny Shakespeare: language modelling, so the prompt is empty and each
  paragraph (a speech) is the response; train is the first 90% of the lines,
  test the last 10%.

Responses start with a space because the prompt and the response are tokenized
separately: the space belongs to the response's first word, as in the text.
"""

# SST-2's prompt and its label words for labels 0 and 1.
SST2_PROMPT = 'Review: {sentence}\nSentiment:'
SST2_LABEL_WORDS = (' negative', ' positive')

# TREC's prompt, its coarse classes (the `coarse` column) and a label word for each.
TREC_PROMPT = 'Question: {question}\nType:'
TREC_CLASSES = ('ABBR', 'DESC', 'ENTY', 'HUM', 'LOC', 'NUM')
TREC_LABEL_WORDS = (' abbreviation', ' description', ' entity', ' person', ' location', ' number')

BUILTIN_SOURCES = {
    'sst2': {
        'format': 'tsv',
        'files': {'train': 'sst2/train.tsv', 'dev': 'sst2/dev.tsv', 'test': 'sst2/test.tsv'},
        'prompt': SST2_PROMPT, 'response': '{label}',
        'labels': {'label': dict(zip(('0', '1'), SST2_LABEL_WORDS))},
    },
    'gsm8k': {
        'format': 'jsonl',
        'files': {'train': 'gsm8k/train.jsonl', 'test': 'gsm8k/test.jsonl'},
        'prompt': 'Question: {question}\nAnswer:', 'response': ' {answer}',
    },
    'trec': {
        'format': 'tsv',
        'files': {'train': 'trec/train.tsv', 'test': 'trec/test.tsv'},
        'prompt': TREC_PROMPT, 'response': '{coarse}',
        'labels': {'coarse': dict(zip(TREC_CLASSES, TREC_LABEL_WORDS))},
        'held_out': {'split': 'dev', 'fraction': 0.1},
    },
    'tinyshakespeare': {
        'format': 'paragraphs',
        'files': {'train': 'tinyshakespeare/input.txt'},
        'prompt': '', 'response': '{text}',
        'held_out': {'split': 'test', 'fraction': 0.1},
    },
}
