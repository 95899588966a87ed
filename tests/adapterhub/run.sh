#!/usr/bin/env bash
# Cross-check of our AdapterHub files against AdapterHub itself (`adapters` 1.3.0). AdapterHub pins
# transformers 4.57, so it runs in its own venv, created once (about 45 s, 1.2 GB) under
# ${ADDITIVE_JAX_CACHE:-~/.cache/additive_jax}/adapterhub-venv; the two sides share a tiny random
# Llama (one safetensors file) and exchange adapters and logits through a temporary directory:
#   1. here:       Pfeiffer, Houlsby and parallel adapters with random weights -> AdapterHub files
#   2. AdapterHub: loads them (use_safetensors=True) and computes logits; creates its own seq_bn,
#                  double_seq_bn and par_bn adapters with random weights, saves them, computes logits
#   3. here:       compares both sets of logits (max relative error <= 1e-5) and reads AdapterHub's files
# Run from anywhere: bash tests/adapterhub/run.sh   (MAIN_PYTHON: the interpreter with additive_jax)
set -euo pipefail
cd "$(dirname "$0")/../.."
MAIN_PYTHON="${MAIN_PYTHON:-.venv/bin/python}"
VENV="${ADDITIVE_JAX_CACHE:-$HOME/.cache/additive_jax}/adapterhub-venv"
if [ ! -f "$VENV/complete" ]; then  # the marker is written last: an interrupted install is redone
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # torch pinned exactly: an unpinned torch would pull the CUDA build (gigabytes)
  "$VENV/bin/python" -m pip install -q torch==2.13.0 adapters==1.3.0 safetensors numpy
  touch "$VENV/complete"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$MAIN_PYTHON" tests/adapterhub/jax_side.py export "$WORK"
"$VENV/bin/python" tests/adapterhub/adapterhub_side.py "$WORK"
"$MAIN_PYTHON" tests/adapterhub/jax_side.py compare "$WORK"
