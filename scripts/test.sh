#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build. torch==2.13.0 is a CPU build that
# these machines keep on local disk; anywhere else it comes from the package index.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[test]"

# Training stacks for tests/test_stacks_*.py (torchtitan, DeepSpeed, OLMo-core, NeMo Automodel, LitGPT, lucidrains'
# st-moe-pytorch / mixture-of-experts, Megatron-Core), at the tested versions. Their own requirements clash with each
# other and with transformers 5.x (LitGPT and NeMo Automodel pin older transformers, torchtitan and OLMo-core would
# downgrade huggingface_hub), so they go in --no-deps with the few packages their MoE layers import, and torch,
# transformers and their dependencies stay as they are (torch stays the CPU build). A failed install does not stop
# the rest of the suite, but in CI (CI set) the stack tests then fail instead of skipping (MOEWATCH_REQUIRE_STACKS,
# see tests/stack_import.py).
STACKS=(
  triton==3.9.0 torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1
  deepspeed==0.19.8 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 einops==0.8.2
  ai2-olmo-core==3.0.0 cached_path==1.8.10 dataclass-extensions==0.5.0 bettermap==1.3.1 dill==0.4.0
  google-api-core==2.44.0 google-auth==2.63.0 google-cloud-storage==3.17.1 google-cloud-core==2.8.0
  google-resumable-media==2.11.0 google-crc32c==1.9.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0
  pyasn1_modules==0.4.2
  nemo-automodel==0.7.0 litgpt==0.5.13 megatron-core==0.16.1
  st-moe-pytorch==0.1.8 mixture-of-experts==0.2.3 CoLT5-attention==0.11.2 local-attention==1.11.2
  hyper-connections==0.4.11 torch-einops-utils==0.2.0 beartype==0.23.1
)
if ! DS_BUILD_OPS=0 "$PY" -m pip install --quiet --no-deps "${STACKS[@]}"; then
  echo "scripts/test.sh: installing the training stacks failed; tests/test_stacks_*.py will skip (fail in CI)" >&2
fi
if [ -n "${CI:-}" ]; then export MOEWATCH_REQUIRE_STACKS=1; fi

# A real browser for the dashboard tests (Debian's chromium + chromedriver).
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "scripts/test.sh: chromium/chromedriver missing and cannot apt-get them; browser tests will be skipped" >&2
  fi
fi

"$PY" -m ruff check .
"$PY" -m pytest "$@"
