#!/usr/bin/env bash
# make bench: release build, then `holdfast-bench run`, which starts a local
# Kafka broker and capture pods itself, runs every scenario and writes
# target/bench/report.md, report.json and PNG plots. Asserts no speed.
#
# Knobs (environment): BENCH_SECS (measured seconds per scenario, default 10),
# BENCH_WARMUP_SECS (1), BENCH_DRAIN_EVENTS (1,000,000; 0 skips the drains),
# BENCH_ROUNDS (1: how many times each scenario and drain runs; the report
# gives medians and each comparison's range over the rounds),
# BENCH_ARGS (more `holdfast-bench run` flags, e.g. "--only fsync,drain").
# BASELINE=<git revision>: also build that revision's holdfast-capture (a git
# worktree under /tmp, its own target dir under ~/.cache/holdfast/bench-baseline,
# kept for the next run) and run every capture scenario against both builds,
# alternating; the report gives this build / baseline per figure.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p holdfast-capture -p holdfast-bench --bins
# holdfast-dev only launches the Kafka broker: the debug build serves.
cargo build -q -p holdfast-e2e --bin holdfast-dev
bash e2e/kafka/fetch.sh >/dev/null

args=(--bin-dir target/release --dev-bin target/debug/holdfast-dev --out target/bench)
if [[ -n "${BASELINE:-}" ]]; then
  rev="$(git rev-parse --short=12 "${BASELINE}^{commit}")"
  cache="${HOLDFAST_CACHE_DIR:-$HOME/.cache/holdfast}/bench-baseline/$rev"
  capture="$cache/target/release/holdfast-capture"
  if [[ ! -x "$capture" ]]; then
    tree="/tmp/holdfast-bench-baseline-$rev"
    git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
    git worktree prune
    echo "bench: building $rev's holdfast-capture in $tree (target dir $cache/target; the first time takes minutes)" >&2
    git worktree add -q --detach "$tree" "$rev"
    trap 'git worktree remove --force "$tree" 2>/dev/null || true' EXIT
    (cd "$tree" && CARGO_TARGET_DIR="$cache/target" cargo build --release -q -p holdfast-capture --bin holdfast-capture)
    git worktree remove --force "$tree"
    trap - EXIT
  fi
  args+=(--baseline-capture "$capture" --baseline-label "$rev")
fi
echo "bench: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure; the ratios drift less)" >&2
# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
target/release/holdfast-bench run "${args[@]}" ${BENCH_ARGS:-}
