#!/usr/bin/env bash
# make demo: build, start a local Kafka and a capture pod, send events, show
# them arriving in Kafka, then keep the endpoint up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

port="${DEMO_PORT:-8080}"
work="${DEMO_DIR:-$(mktemp -d -t holdfast-demo-XXXXXX)}"
bin=target/debug

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building (first run compiles librdkafka and fetches Kafka from Maven Central; takes a few minutes)"
cargo build --bins -q
bash e2e/kafka/fetch.sh >/dev/null

pids=()
cleanup() {
  say "stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo files left in $work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting Kafka (KRaft, one node on 127.0.0.1)"
"$bin/holdfast-dev" kafka >"$work/kafka.out" 2>"$work/kafka.log" &
pids+=($!)
for _ in $(seq 600); do
  grep -q '^KAFKA_BOOTSTRAP=' "$work/kafka.out" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/kafka.log"; exit 1; }
  sleep 0.2
done
bootstrap="$(sed -n 's/^KAFKA_BOOTSTRAP=//p' "$work/kafka.out")"
[[ -n "$bootstrap" ]] || { echo "kafka did not start; see $work/kafka.log"; exit 1; }
echo "kafka at $bootstrap"
"$bin/holdfast-dev" create-topic --bootstrap "$bootstrap" --topic events --partitions 3 --if-not-exists
"$bin/holdfast-dev" create-topic --bootstrap "$bootstrap" --topic web.clicks --partitions 3 --if-not-exists

say "starting holdfast-capture on 127.0.0.1:$port (buffer in $work/buffer)"
"$bin/holdfast-capture" serve \
  --listen "127.0.0.1:$port" \
  --data-dir "$work/buffer" \
  --kafka-bootstrap "$bootstrap" \
  --stream default=events \
  --stream clicks=web.clicks \
  2>"$work/capture.log" &
pids+=($!)
for _ in $(seq 300); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "${pids[1]}" 2>/dev/null || { cat "$work/capture.log"; exit 1; }
  sleep 0.1
done
curl -fs "http://127.0.0.1:$port/readyz" >/dev/null || { echo "capture not ready; see $work/capture.log"; exit 1; }

say "sending events"
set -x
curl -sS -H 'content-type: application/json' \
  -d '{"uuid":"0190a6e2-6f1b-7c3a-9f00-000000000001","key":"user-1","action":"signup"}' \
  "http://127.0.0.1:$port/v1/events"; echo
curl -sS -H 'content-type: application/json' \
  -d '[{"key":"user-2","action":"login"},{"key":"user-2","action":"view","page":"/pricing"}]' \
  "http://127.0.0.1:$port/v1/events"; echo
printf '{"button":"buy"}\n{"button":"cancel"}\n' | gzip | curl -sS \
  -H 'content-type: application/x-ndjson' -H 'content-encoding: gzip' --data-binary @- \
  "http://127.0.0.1:$port/v1/events/clicks"; echo
curl -sS -H 'content-type: application/json' -d '[{"ok":1},{"pad":' \
  "http://127.0.0.1:$port/v1/events"; echo
set +x

say "events in Kafka topic 'events'"
"$bin/holdfast-dev" consume --bootstrap "$bootstrap" --topic events --count 3 --timeout-secs 30
say "events in Kafka topic 'web.clicks'"
"$bin/holdfast-dev" consume --bootstrap "$bootstrap" --topic web.clicks --count 2 --timeout-secs 30

say "buffer (holdfast-capture inspect)"
"$bin/holdfast-capture" inspect --data-dir "$work/buffer"

say "ready: the endpoint stays up until Ctrl-C"
cat <<MSG
  curl -H 'content-type: application/json' -d '{"hello":"world"}' http://127.0.0.1:$port/v1/events
  $bin/holdfast-dev consume --bootstrap $bootstrap --topic events --count 4
  curl http://127.0.0.1:$port/metrics
  logs: $work/capture.log, $work/kafka.log
MSG
wait "${pids[1]}"
