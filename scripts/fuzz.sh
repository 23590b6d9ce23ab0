#!/usr/bin/env bash
# Coverage-guided fuzzing of request decoding (capture/fuzz, cargo-fuzz + libFuzzer).
#
#   scripts/fuzz.sh smoke [SECONDS]   each target for SECONDS (default 5) on a copy of the
#                                     committed corpus; fails on any crash (part of make test)
#   scripts/fuzz.sh run [SECONDS]     each target for SECONDS (default 150), growing
#                                     capture/fuzz/corpus, then minimizes it (cmin)
#
# Needs cargo-fuzz (installed from crates.io when missing) and a nightly compiler:
# `+nightly` when rustup has one, else the stable compiler with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/../capture/fuzz"

mode=${1:-smoke}
TARGETS=(content_type gunzip parse_json parse_ndjson key_pointer)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  echo "fuzz: no nightly toolchain; using the stable compiler with RUSTC_BOOTSTRAP=1" >&2
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

# Outside the checkout, so a fresh clone (CI) reuses the instrumented dependencies.
target_dir=${HOLDFAST_FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/holdfast/fuzz-target}
"${fuzz[@]}" build -O --target-dir "$target_dir"
bin=$target_dir/x86_64-unknown-linux-gnu/release
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

# Runs target $1 on corpus dirs $3.. for $2 seconds; libFuzzer exits non-zero on a failure.
fuzz_for() {
  local t=$1 secs=$2
  shift 2
  "$bin/$t" "$@" -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1
}

case "$mode" in
  smoke)
    secs=${2:-5}
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    for t in "${TARGETS[@]}"; do
      mkdir -p "$work/$t"
      cp corpus/"$t"/* "$work/$t"/ 2>/dev/null || true
      if ! fuzz_for "$t" "$secs" "$work/$t" -artifact_prefix="$work/" >"$work/$t.log" 2>&1; then
        echo "fuzz smoke: $t FAILED; the failing input and report:" >&2
        ls "$work"/crash-* "$work"/leak-* "$work"/oom-* "$work"/timeout-* 2>/dev/null >&2 || true
        tail -40 "$work/$t.log" >&2
        exit 1
      fi
      execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
      cov=$(grep -E '^#[0-9]+' "$work/$t.log" | tail -1 | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
      echo "fuzz smoke: $t ${secs}s, ${execs:-?} executions, coverage ${cov:-?} edges, no failure" >&2
    done
    ;;
  run)
    secs=${2:-150}
    for t in "${TARGETS[@]}"; do
      mkdir -p corpus/"$t" artifacts/"$t"
      rm -rf corpus-work/"$t"
      mkdir -p corpus-work/"$t"
      fuzz_for "$t" "$secs" corpus-work/"$t" corpus/"$t" -artifact_prefix=artifacts/"$t"/ \
        >"$target_dir/fuzz-$t.log" 2>&1 || echo "fuzz run: $t FAILED, see $target_dir/fuzz-$t.log and artifacts/$t" >&2
      grep -E '^stat::number_of_executed_units|DONE' "$target_dir/fuzz-$t.log" >&2 || true
      # Keep the smallest set of inputs with the same edge coverage (merge = cmin;
      # without hit counts and comparison features, so the corpus stays small).
      mkdir -p corpus-min/"$t"
      "$bin/$t" -merge=1 -use_counters=0 -use_cmp=0 corpus-min/"$t" corpus/"$t" corpus-work/"$t" \
        >/dev/null 2>&1
      rm -rf corpus/"$t" corpus-work/"$t"
      mv corpus-min/"$t" corpus/"$t"
      echo "fuzz run: $t corpus $(ls corpus/"$t" | wc -l) inputs after merge" >&2
    done
    rmdir corpus-min corpus-work 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 smoke|run [SECONDS]" >&2
    exit 2
    ;;
esac
