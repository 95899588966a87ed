"""Data: files → prompt/response → template → tokens, targets, loss mask → packed batches.

Readers and source specs (`readers`, `sources`), TFDS builders that prepare each
source offline as ArrayRecord (`tfds_builders`), templates and tokenization
(`templates`), the over-long policy and masks (`encode`), packing and padding
(`packing`), and the grain pipeline (`pipeline`). `data_config()` lists the
keys of `config.data` and where the data and cache folders are.
"""
