#!/usr/bin/env bash
# Builds the Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler), etcd and helm used by the e2e tests from the pinned Go
# modules in e2e/go/, once, into a cache outside the repository:
#
#   ${HOLDFAST_CACHE:-$HOME/.cache/holdfast}/k8s-<version>/bin
#
# The directory is keyed by the Kubernetes version; a marker file holds a
# checksum of the pins (go.mod, go.sum, the etcd main), so changing a pin
# rebuilds and running it again is a no-op. Prints the bin directory on
# stdout (the tests find it the same way, or through HOLDFAST_K8S_BIN).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kube_mod="$here/go/kubernetes"
helm_mod="$here/go/helm"

version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { sub(/^v/, "", $2); print $2; exit }' "$kube_mod/go.mod")"
if [[ -z "$version" ]]; then
    echo "bins.sh: cannot read the k8s.io/kubernetes version from $kube_mod/go.mod" >&2
    exit 1
fi
cache="${HOLDFAST_CACHE:-$HOME/.cache/holdfast}"
out="$cache/k8s-$version"
bin="$out/bin"
marker="$out/.complete"

pins="$(cat "$kube_mod/go.mod" "$kube_mod/go.sum" "$kube_mod/etcd/main.go" \
    "$helm_mod/go.mod" "$helm_mod/go.sum" | sha256sum | cut -d' ' -f1)"
if [[ -f "$marker" && "$(cat "$marker")" == "$pins" ]]; then
    for b in kube-apiserver kube-controller-manager kube-scheduler etcd helm; do
        [[ -x "$bin/$b" ]] || { rm -f "$marker"; break; }
    done
    if [[ -f "$marker" ]]; then
        echo "$bin"
        exit 0
    fi
fi

if ! command -v go >/dev/null; then
    echo "bins.sh: the Go toolchain (>= 1.25) is needed to build the control plane" >&2
    exit 1
fi

mkdir -p "$bin"
rm -f "$marker"
start=$SECONDS
# -trimpath and -s -w keep the binaries small and the build reproducible;
# CGO is off so the binaries are static like upstream's release builds.
export CGO_ENABLED=0
flags=(-trimpath -ldflags=-s\ -w)

echo "bins.sh: building Kubernetes $version control plane and etcd into $bin" >&2
(cd "$kube_mod" && go build "${flags[@]}" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    ./etcd)
echo "bins.sh: building helm into $bin" >&2
(cd "$helm_mod" && go build "${flags[@]}" -o "$bin/helm" helm.sh/helm/v3/cmd/helm)

echo "$pins" > "$marker"
echo "bins.sh: built in $((SECONDS - start))s" >&2
echo "$bin"
