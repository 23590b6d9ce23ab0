#!/usr/bin/env bash
# make bench: release build, a local Kafka, one capture pod with --durability
# fsync on this machine's disk, then wrk (closed loop) and holdfast-load (fixed
# rate). Prints the figures; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${BENCH_SECS:-10}"
work="$(mktemp -d -t holdfast-bench-XXXXXX)"
bin=target/release
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }; }
cargo build --release --bins -q
bash e2e/kafka/fetch.sh >/dev/null

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin/holdfast-dev" kafka >"$work/kafka.out" 2>"$work/kafka.log" &
pids+=($!)
for _ in $(seq 600); do grep -q '^KAFKA_BOOTSTRAP=' "$work/kafka.out" 2>/dev/null && break; sleep 0.2; done
bootstrap="$(sed -n 's/^KAFKA_BOOTSTRAP=//p' "$work/kafka.out")"
"$bin/holdfast-dev" create-topic --bootstrap "$bootstrap" --topic events --partitions 6 --if-not-exists >/dev/null

run_capture() {
  local port=$1; shift
  rm -rf "$work/buffer-$port"
  "$bin/holdfast-capture" serve --listen "127.0.0.1:$port" --data-dir "$work/buffer-$port" \
    --kafka-bootstrap "$bootstrap" --buffer-quota-bytes 8000000000 "$@" 2>"$work/capture-$port.log" &
  pids+=($!)
  for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "capture did not start"; cat "$work/capture-$port.log"; exit 1
}

run_capture 18181
url=http://127.0.0.1:18181/v1/events
echo "== machine: $(nproc) cores; durability fsync; buffer on $(df -h "$work" | awk 'NR==2{print $1}')"
echo "== 1 event/request, 32 connections, ${secs}s (wrk)"
wrk -t2 -c32 -d"${secs}s" --latency -s scripts/bench/single.lua "$url" | grep -E "Requests/sec|Latency|50%|99%|Non-2xx"
echo "== 100 events/request, 32 connections, ${secs}s (wrk; events/s = requests/s x 100)"
wrk -t2 -c32 -d"${secs}s" --latency -s scripts/bench/batch100.lua "$url" | grep -E "Requests/sec|Latency|50%|99%|Non-2xx"
echo "== fixed rate 10,000 requests/s, 1 event/request (holdfast-load)"
"$bin/holdfast-load" --url "$url" --rate 10000 --connections 32 --duration-secs "$secs"
echo "== ingest only: same pod shape, Kafka unreachable (forwarder idle), 1 event/request, 32 connections"
bootstrap_saved="$bootstrap"; bootstrap=127.0.0.1:9; run_capture 18182; bootstrap="$bootstrap_saved"
wrk -t2 -c32 -d"${secs}s" --latency -s scripts/bench/single.lua http://127.0.0.1:18182/v1/events | grep -E "Requests/sec|Latency|50%|99%|Non-2xx"
"$bin/holdfast-load" --url http://127.0.0.1:18182/v1/events --rate 10000 --connections 32 --duration-secs "$secs"
echo "== load average during the run: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
echo "== commits: $(curl -s http://127.0.0.1:18181/metrics | grep -E '^holdfast_buffer_commit_batch_commands_(sum|count)' | tr '\n' ' ')"
echo "== backlog after the runs: $(curl -s http://127.0.0.1:18181/metrics | grep -E '^holdfast_buffer_events ')"
