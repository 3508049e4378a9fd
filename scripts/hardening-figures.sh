#!/usr/bin/env bash
# Figures for the hardening work, measured through the real daemon on the demo models (release
# build, `make models` first):
#   1. latency of a 2-token request on one model while a 400-token prompt runs on another, and how
#      long `halo cancel` takes to stop that prompt, with prompt chunks of 256 tokens (one forward
#      per chunk, as before step_tokens existed) beside the default 64;
#   2. halod's resident memory (VmRSS) around large Tokenize requests: one near max_request
#      (served) and one over it (refused), five times each, to see that memory does not ratchet.
#
#   scripts/hardening-figures.sh [latency|rss]   (both by default; prints figures, asserts nothing)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
[ -x "$bin/halod" ] && [ -x "$bin/halo" ] || { echo "build first: cargo build --release" >&2; exit 2; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

start_daemon() { # step_tokens
  cat > "$work/halod.toml" <<EOF
[daemon]
step_tokens = $1
[[models]]
name = "smol"
kind = "llm"
path = "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
context = 512
parallel = 1
[[models]]
name = "gemma"
kind = "llm"
path = "$root/models/gemma-3-270m-q4_k_m.gguf"
context = 256
parallel = 1
EOF
  HALO_LOG=warn "$bin/halod" --config "$work/halod.toml" --listen "unix:$work/halod.sock" \
    2>"$work/halod.log" &
  pid=$!
  export HALO_ADDR=unix:$work/halod.sock
  for _ in $(seq 100); do "$bin/halo" status >/dev/null 2>&1 && break; sleep 0.1; done
  "$bin/halo" load smol >/dev/null
  "$bin/halo" load gemma >/dev/null
}

stop_daemon() { kill -TERM "$pid"; wait "$pid" || true; }

# A different 400-token prompt for each request: a repeated one would reuse the cached prefix.
n_ids=0
next_ids() {
  n_ids=$((n_ids + 1))
  ids=$(seq 0 399 | awk -v k="$n_ids" '{ printf "%s%d", (NR > 1 ? "," : ""), 100 + ($1 * 37 + k * 101) % 5000 }')
}
what=${1:-all}
if [ "$what" != rss ]; then
printf '%-12s %-28s %s\n' "step_tokens" "figure" "seconds"
for step in 256 64; do
  start_daemon "$step"
  # The long prompt alone, for reference.
  next_ids
  t0=$(now); "$bin/halo" generate smol --tokens "$ids" --max-tokens 1 >/dev/null; t1=$(now)
  printf '%-12s %-28s %s\n' "$step" "400-token prompt alone" "$(secs "$t0" "$t1")"
  # A short request on the other model while the long prompt runs.
  next_ids
  "$bin/halo" generate smol --tokens "$ids" --max-tokens 1 >/dev/null &
  long=$!
  until "$bin/halo" jobs --json | grep -q '"running"'; do sleep 0.05; done
  t0=$(now); "$bin/halo" generate gemma "Hi" --max-tokens 2 >/dev/null; t1=$(now)
  printf '%-12s %-28s %s\n' "$step" "2-token request meanwhile" "$(secs "$t0" "$t1")"
  wait "$long"
  # Cancelling the long prompt mid-way.
  next_ids
  "$bin/halo" generate smol --tokens "$ids" --max-tokens 1 >/dev/null &
  long=$!
  until "$bin/halo" jobs --json | grep -q '"running"'; do sleep 0.05; done
  sleep 1
  job=$("$bin/halo" jobs --json | python3 -c \
    'import json, sys; print([j["id"] for j in json.load(sys.stdin) if j["state"] == "running"][0])')
  t0=$(now); "$bin/halo" cancel "$job" >/dev/null; wait "$long" || true; t1=$(now)
  printf '%-12s %-28s %s\n' "$step" "cancel takes effect" "$(secs "$t0" "$t1")"
  stop_daemon
done
fi
[ "$what" = latency ] && exit 0

start_daemon 64
rss() { awk '/VmRSS/ { printf "%.0f MiB", $2 / 1024 }' "/proc/$pid/status"; }
echo
echo "halod VmRSS after loading both models: $(rss)"
python3 -c "print('word ' * (3 * 1024 * 1024 // 5))" > "$work/3mib.txt"
python3 -c "print('word ' * (8 * 1024 * 1024 // 5))" > "$work/8mib.txt"
for i in 1 2 3 4 5; do
  "$bin/halo" tokenize smol - < "$work/3mib.txt" | wc -w | tr -d '\n' > "$work/n"
  echo "after 3 MiB Tokenize #$i ($(cat "$work/n") tokens): $(rss)"
done
for i in 1 2 3 4 5; do
  t0=$(now); "$bin/halo" tokenize smol - < "$work/8mib.txt" >/dev/null 2>&1 || true; t1=$(now)
  echo "after refused 8 MiB Tokenize #$i ($(secs "$t0" "$t1") s): $(rss)"
done
# halod hands freed heap back a few seconds after a large request (see daemon/src/heap.rs).
sleep 4
echo "4 s later: $(rss)"
stop_daemon
