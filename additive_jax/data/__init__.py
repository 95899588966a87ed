"""Data: files → prompt/response → template → tokens, targets, loss mask → packed batches.

Readers and source specs (`readers`, `sources`), TFDS builders that prepare each
source offline as ArrayRecord (`tfds_builders`), templates and tokenization
(`templates`), the over-long policy and masks (`encode`), packing and padding
(`packing`), and the grain pipeline (`pipeline`). `data_config()` lists the
keys of `config.data`.
"""

from additive_jax.data.config import data_config
from additive_jax.data.encode import LengthReport
from additive_jax.data.packing import pad_fraction
from additive_jax.data.pipeline import make_eval_batches, make_train_iterator
