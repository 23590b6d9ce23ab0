#!/usr/bin/env bash
# Fetch the Apache Kafka broker (version pinned in pom.xml beside this script)
# from Maven Central into a cache outside the repository, and print the
# directory holding its classpath:
#
#   ${HOLDFAST_CACHE:-$HOME/.cache/holdfast}/kafka-<version>/libs
#
# Needs only a JDK (17+) and Maven. Idempotent: once a fetch has completed
# (marker file written last) it prints the directory and does nothing else.
# Safe to run concurrently: a lock serialises fetches of the same version.
# Maven's own output goes to stderr; stdout carries only the path.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom="$here/pom.xml"

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
if [[ -z "$version" ]]; then
  echo "fetch.sh: no <kafka.version> in $pom" >&2
  exit 1
fi

cache="${HOLDFAST_CACHE:-$HOME/.cache/holdfast}"
dir="$cache/kafka-$version"
libs="$dir/libs"
marker="$dir/complete"

if [[ -f "$marker" ]]; then
  echo "$libs"
  exit 0
fi

mkdir -p "$dir"
exec 9>"$dir/lock"
flock 9

# Another fetch may have finished while we waited for the lock.
if [[ ! -f "$marker" ]]; then
  for tool in java mvn; do
    if ! command -v "$tool" >/dev/null; then
      echo "fetch.sh: '$tool' not found: install a JDK 17+ and Maven" >&2
      exit 1
    fi
  done
  echo "fetch.sh: fetching Apache Kafka $version from Maven Central into $libs" >&2
  staging="$dir/libs.partial"
  rm -rf "$staging" "$libs"
  # Maven 3.8 prints bare colour resets even in batch mode: drop them.
  mvn --batch-mode --quiet --file "$pom" \
    dependency:copy-dependencies \
    -DincludeScope=runtime \
    -DoutputDirectory="$staging" 2>&1 | sed -e $'s/\x1b\\[[0-9;]*m//g' >&2
  if ! compgen -G "$staging/kafka_2.13-$version.jar" >/dev/null; then
    echo "fetch.sh: maven finished but kafka_2.13-$version.jar is missing from $staging" >&2
    exit 1
  fi
  mv "$staging" "$libs"
  echo "$version" >"$marker"
fi

echo "$libs"
