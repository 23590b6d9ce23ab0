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
    "$helm_mod/go.mod" "$helm_mod/go.sum" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
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
# Build time on this 2-core machine, cold caches: about 13 minutes
# (kube binaries ~11, helm ~2); with Go's build cache warm, seconds.
export CGO_ENABLED=0
# The version variables upstream's hack/lib/version.sh stamps in: without
# them /version reports v0.0.0-master and version checks (helm's kubeVersion,
# clients' discovery) see a nonsense server.
major="${version%%.*}"
minor="${version#*.}"
minor="${minor%%.*}"
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ldflags+=" -X $pkg.gitVersion=v$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
helm_version="$(awk '$1 == "helm.sh/helm/v3" { print $2; exit }' "$helm_mod/go.mod")"
# Like helm's Makefile: the default Kubernetes version of `helm template` and
# `helm lint` follows the client-go it is built with (v0.N -> 1.N).
helm_k8s_minor="$(cd "$helm_mod" && go list -f '{{.Version}}' -m k8s.io/client-go | cut -d. -f2)"
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_k8s_minor"
done

echo "bins.sh: building Kubernetes $version control plane and etcd into $bin" >&2
(cd "$kube_mod" && go build -trimpath -ldflags="$kube_ldflags" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    ./etcd)
echo "bins.sh: building helm into $bin" >&2
(cd "$helm_mod" && go build -trimpath -ldflags="$helm_ldflags" -o "$bin/helm" helm.sh/helm/v3/cmd/helm)

echo "$pins" > "$marker"
echo "bins.sh: built in $((SECONDS - start))s" >&2
echo "$bin"
