#!/usr/bin/env bash
# SDXL at real scale through the real daemon (release build): a full-size single-file checkpoint,
# e.g. the random one scripts/make-random-sdxl-base.py writes, with no diffusers_config, so the
# shapes are inferred and the built-in CLIP vocabulary tokenizes. Prints the load time, the
# estimated bytes (`halo models`) beside what `halo ps` and the device ledger hold, and
# `halo bench` at a small size (text encode, s/step, VAE decode, kernels, job estimates at that
# size and at 1024²). Prints figures, asserts nothing; not run in CI.
#
#   scripts/sdxl-scale-figures.sh CHECKPOINT [WIDTH HEIGHT STEPS]   (default 128 128 2)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
[ -x "$bin/halod" ] && [ -x "$bin/halo" ] || { echo "build first: cargo build --release" >&2; exit 2; }
ckpt=$(realpath "${1:?usage: $0 CHECKPOINT [WIDTH HEIGHT STEPS]}")
w=${2:-128} h=${3:-128} steps=${4:-2}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/halod.toml" <<TOML
[daemon]
listen = "unix:$work/halod.sock"
[[models]]
name = "sdxl"
kind = "sdxl"
path = "$ckpt"
TOML
"$bin/halod" --config "$work/halod.toml" 2> "$work/halod.log" &
export HALO_ADDR="unix:$work/halod.sock"
for _ in $(seq 100); do "$bin/halo" status > /dev/null 2>&1 && break; sleep 0.1; done
"$bin/halo" status | grep -i -E "device|budget" || true
echo "estimated (halo models): $("$bin/halo" models --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["estimated_bytes"])') bytes"
t0=$(date +%s.%N)
"$bin/halo" load sdxl
t1=$(date +%s.%N)
echo "load: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
"$bin/halo" ps --json | python3 -c 'import json,sys; print("resident (halo ps):", json.load(sys.stdin)[0]["bytes"], "bytes")'
"$bin/halo" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print("device ledger:", s["gpu_allocated_bytes"], "bytes; used under the budget:", s["used_bytes"])'
"$bin/halo" bench sdxl --width "$w" --height "$h" --steps "$steps" -r 1
