# Sourced by scripts/quickstart.sh and .ci/run: `source scripts/setup.sh`.
# Creates .venv with jaxllm and the extras in $JAXLLM_EXTRAS (default
# "test,hf,eval,tpu-preflight": what the tests need; quickstart sets it empty, as the main job
# needs neither pytest nor PyTorch), at the exact versions of constraints.txt (pyproject.toml
# has ranges), and, where an offline data mirror sits beside the checkout (../shared, or $JAXLLM_SHARED), points
# tiktoken and TFDS at it so nothing is downloaded. On a connected machine without the mirror,
# tiktoken and TFDS download as usual.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
extras="${JAXLLM_EXTRAS-test,hf,eval,tpu-preflight}"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".${extras:+[$extras]}"

shared="${JAXLLM_SHARED:-$repo/../shared}"
if [ -d "$shared/tiktoken_cache" ]; then
  export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$(cd "$shared/tiktoken_cache" && pwd)}"
fi
if [ -d "$shared/data" ]; then
  export JAXLLM_SHARED_DATA="$(cd "$shared/data" && pwd)"
  export TFDS_DATA_DIR="${TFDS_DATA_DIR:-$repo/.data/tensorflow_datasets}"
  .venv/bin/python scripts/seed_tfds_downloads.py "$TFDS_DATA_DIR" "$JAXLLM_SHARED_DATA"
fi
export PATH="$repo/.venv/bin:$PATH"
