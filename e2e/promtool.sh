#!/usr/bin/env bash
# Builds Prometheus' promtool (checks and unit-tests the chart's alerting
# rules, e2e/tests/chart_rules.rs) once, from the pinned Go module, into a
# cache outside the repository:
#
#   ${HOLDFAST_CACHE:-$HOME/.cache/holdfast}/promtool-<version>/promtool
#
# Prints the binary's path on stdout; running it again is a no-op. Needs the
# Go toolchain and the Go module proxy on the first run (about 6 minutes on a
# 2-core machine with a cold build cache).
set -euo pipefail

# Prometheus v3.x is published as Go module version v0.3xx.y.
version="v0.316.0"
cache="${HOLDFAST_CACHE:-$HOME/.cache/holdfast}"
out="$cache/promtool-$version"
bin="$out/promtool"
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
if ! command -v go >/dev/null; then
    echo "promtool.sh: the Go toolchain is needed to build promtool" >&2
    exit 1
fi
mkdir -p "$out"
start=$SECONDS
# Static, small, reproducible; built into a temporary name and renamed so a
# killed build never leaves a half-written binary behind.
CGO_ENABLED=0 GOBIN="$out/.build" go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$version" >&2
mv "$out/.build/promtool" "$bin"
rmdir "$out/.build"
echo "promtool.sh: built promtool $version in $((SECONDS - start)) s" >&2
echo "$bin"
