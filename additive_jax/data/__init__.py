"""Data: declared files → rows → examples (pairs or conversations) → token segments, targets,
loss mask → packed batches.

`config.data.source` declares a data set (`config.source_config`; the built-ins in
`builtins`), resolved and checked into a `spec.SourceSpec` by `declarations`.
Readers of the file formats (`readers`), a split's rows checked and rendered by
their templates (`render`, `sources`; conversations in `chat`), one TFDS builder
that prepares any declared source offline as ArrayRecord (`tfds_builders`), the
tokenizer's template and tokenization into target/non-target segments
(`templates`), the over-long policy and masks (`encode`), packing and padding
(`packing`), the grain pipeline (`pipeline`), and several declared sources trained
mixed by weight (`mixture`, `config.data.mixture`). `data_config()` lists the keys
of `config.data` and where the data and cache folders are.
"""
