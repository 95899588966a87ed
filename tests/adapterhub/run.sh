#!/usr/bin/env bash
# Cross-check of our AdapterHub files against AdapterHub itself (`adapters` 1.3.0). AdapterHub pins
# transformers 4.57, so it runs in its own venv, created once (about 10 s, 60 MB) under
# ${ADDITIVE_JAX_CACHE:-~/.cache/additive_jax}/adapterhub-venv. That venv holds only what differs from
# the main environment (adapters, transformers 4.57 and the tokenizers and huggingface_hub it pins);
# a .pth file puts the main environment's site-packages after its own, so torch (the same 2.13.0
# pin), numpy and safetensors come from there instead of a second 1 GB copy. The main environment
# is not touched. The two sides share a tiny random Llama (one safetensors file) and exchange
# adapters and logits through a temporary directory:
#   1. here:       Pfeiffer, Houlsby and parallel adapters with random weights -> AdapterHub files
#   2. AdapterHub: loads them (use_safetensors=True) and computes logits; creates its own seq_bn,
#                  double_seq_bn and par_bn adapters with random weights, saves them, computes logits
#   3. here:       compares both sets of logits (max relative error <= 1e-5) and reads AdapterHub's files
# The same with Compacters, ReFTs, LoRA, prefixes, MAM, UniPELT and AdapterFusion (a setup folder: its
# adapters and its fusion layer), and on SmolLM2-135M (ours -> AdapterHub, one adapter per family): its
# export is SMOLLM2_EXPORT when set (a directory jax_side.export_smollm2 wrote), else made in step 1.
# Run from anywhere: bash tests/adapterhub/run.sh   (MAIN_PYTHON: the interpreter with additive_jax)
set -euo pipefail
cd "$(dirname "$0")/../.."
MAIN_PYTHON="${MAIN_PYTHON:-.venv/bin/python}"
VENV="${ADDITIVE_JAX_CACHE:-$HOME/.cache/additive_jax}/adapterhub-venv"
if [ ! -f "$VENV/complete" ]; then  # the marker is written last: an interrupted install is redone
  rm -rf "$VENV"
  python3 -m venv --without-pip "$VENV"
  OWN="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$MAIN_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$OWN/main-environment.pth"
  # --no-deps: everything else transformers 4.57 needs is in the main environment, and its import
  # checks the versions it pins (tokenizers, huggingface_hub), so a mismatch fails loudly.
  "$MAIN_PYTHON" -m pip install -q --no-deps --target "$OWN" adapters==1.3.0 transformers==4.57.6 \
    'tokenizers>=0.22,<=0.23.0' 'huggingface-hub>=0.34,<1.0'
  touch "$VENV/complete"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [ -n "${SMOLLM2_EXPORT:-}" ]; then ln -s "$SMOLLM2_EXPORT" "$WORK/smollm2"; fi
"$MAIN_PYTHON" tests/adapterhub/jax_side.py export "$WORK"
"$VENV/bin/python" tests/adapterhub/adapterhub_side.py "$WORK"
"$MAIN_PYTHON" tests/adapterhub/jax_side.py compare "$WORK"
