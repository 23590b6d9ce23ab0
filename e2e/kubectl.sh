#!/usr/bin/env bash
# Builds kubectl at the Kubernetes version the e2e control plane pins
# (e2e/go/kubernetes/go.mod), once, next to the control-plane binaries:
#
#   ${HOLDFAST_CACHE:-$HOME/.cache/holdfast}/k8s-<version>/bin/kubectl
#
# for `make demo-cluster`, which prints a kubectl command to poke at the demo
# cluster. Prints the binary's path on stdout; running it again is a no-op
# (a changed pin rebuilds).
#
# kubectl needs a few modules the control plane does not (cli-runtime,
# kustomize), so it is built in a copy of the wrapper module under the cache
# with -mod=mod: their go.sum lines are added to the copy and checked against
# the Go checksum database, as `go install module@version` does; the
# committed go.mod/go.sum (whose checksum keys bins.sh's cache) stay as they
# are. About 40 s once bins.sh has warmed Go's build cache.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kube_mod="$here/go/kubernetes"
version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { sub(/^v/, "", $2); print $2; exit }' "$kube_mod/go.mod")"
if [[ -z "$version" ]]; then
    echo "kubectl.sh: cannot read the k8s.io/kubernetes version from $kube_mod/go.mod" >&2
    exit 1
fi
cache="${HOLDFAST_CACHE:-$HOME/.cache/holdfast}"
bin="$cache/k8s-$version/bin"
marker="$bin/.kubectl-pins"
pins="$(cat "$kube_mod/go.mod" "$kube_mod/go.sum" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [[ -x "$bin/kubectl" && -f "$marker" && "$(cat "$marker")" == "$pins" ]]; then
    echo "$bin/kubectl"
    exit 0
fi
if ! command -v go >/dev/null; then
    echo "kubectl.sh: the Go toolchain is needed to build kubectl" >&2
    exit 1
fi

work="$cache/k8s-$version/kubectl-module"
rm -rf "$work"
mkdir -p "$work" "$bin"
cp "$kube_mod/go.mod" "$kube_mod/go.sum" "$work/"
major="${version%%.*}"
minor="${version#*.}"
minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
start=$SECONDS
echo "kubectl.sh: building kubectl $version into $bin" >&2
# Built into a temporary name and renamed, so a killed build never leaves a
# half-written binary behind.
(cd "$work" && CGO_ENABLED=0 go build -mod=mod -trimpath -ldflags="$ldflags" \
    -o "$bin/.kubectl.tmp" k8s.io/kubernetes/cmd/kubectl)
mv "$bin/.kubectl.tmp" "$bin/kubectl"
rm -rf "$work"
echo "$pins" > "$marker"
echo "kubectl.sh: built in $((SECONDS - start))s" >&2
echo "$bin/kubectl"
