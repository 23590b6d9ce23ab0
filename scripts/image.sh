#!/usr/bin/env bash
# Builds the Holdfast image from the repository's Dockerfile without a Docker
# engine (buildah, vfs storage, chroot isolation), then run-checks it.
#
#   scripts/image.sh                 # -> holdfast/holdfast:<appVersion>
#   IMAGE=registry.example.com/holdfast:0.1.0 scripts/image.sh
#
# The default name is the chart's default image: repository from
# charts/holdfast/values.yaml (image.repository), tag from
# charts/holdfast/Chart.yaml (appVersion), so the two cannot drift.
#
# No registry is reachable from this machine, so the Debian base image the
# Dockerfile starts FROM is assembled locally: a debootstrap minbase root file
# system of bookworm copied into a scratch image (localhost/holdfast-base),
# made once and reused. Set BASE_IMAGE to use another base instead (e.g.
# docker.io/library/debian:bookworm-slim where registries are reachable).
#
# Needs root and Debian's buildah and debootstrap
# (apt-get install -y buildah debootstrap). Push afterwards with
# `buildah push --storage-driver vfs <image> docker://<registry>/<name>:<tag>`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

repository="$(awk '/^image:/ { in_image = 1; next } in_image && /^[^ ]/ { in_image = 0 }
    in_image && $1 == "repository:" { print $2; exit }' charts/holdfast/values.yaml)"
version="$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2; exit }' charts/holdfast/Chart.yaml)"
if [[ -z "$repository" || -z "$version" ]]; then
    echo "image.sh: cannot read image.repository (values.yaml) or appVersion (Chart.yaml)" >&2
    exit 1
fi
image="${IMAGE:-$repository:$version}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base="${BASE_IMAGE:-localhost/holdfast-base:$suite}"
storage=(--storage-driver vfs)

for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || {
        echo "image.sh: $tool is missing (apt-get install -y buildah debootstrap)" >&2
        exit 1
    }
done
if [[ "$(id -u)" != 0 ]]; then
    echo "image.sh: run as root (buildah with vfs storage and debootstrap need it)" >&2
    exit 1
fi

# 1. The base image, once: debootstrap minbase into a scratch image.
if [[ -z "${BASE_IMAGE:-}" ]] && ! buildah "${storage[@]}" inspect --type image "$base" >/dev/null 2>&1; then
    echo "image.sh: assembling $base with debootstrap ($suite, minbase)" >&2
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -20 "$work/debootstrap.log" >&2
        exit 1
    }
    # Device nodes and caches do not belong in an image.
    rm -rf "$work/rootfs/dev/"* "$work/rootfs/proc/"* "$work/rootfs/sys/"* \
        "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/lib/apt/lists/"* \
        "$work/rootfs/var/log/"*
    ctr="$(buildah "${storage[@]}" from scratch)"
    mnt="$(buildah "${storage[@]}" mount "$ctr")"
    cp -a "$work/rootfs/." "$mnt/"
    buildah "${storage[@]}" umount "$ctr" >/dev/null
    buildah "${storage[@]}" config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$ctr"
    buildah "${storage[@]}" commit --rm "$ctr" "$base" >/dev/null
    rm -rf "$work"
    trap - EXIT
fi

# 1b. The builder's base: the same, plus this host's CA certificates (a
#     TLS-intercepting proxy between here and static.rust-lang.org or
#     crates.io is common on build machines). Only the builder stage uses
#     it; the runtime image keeps Debian's own CA set.
builder="${BUILDER_IMAGE:-$base}"
if [[ -z "${BUILDER_IMAGE:-}" && -z "${BASE_IMAGE:-}" && -r /etc/ssl/certs/ca-certificates.crt ]]; then
    builder="localhost/holdfast-build-base:$suite"
fi
if [[ "$builder" == "localhost/holdfast-build-base:$suite" ]] &&
    ! buildah "${storage[@]}" inspect --type image "$builder" >/dev/null 2>&1; then
    ctr="$(buildah "${storage[@]}" from --pull-never "$base")"
    buildah "${storage[@]}" copy "$ctr" /etc/ssl/certs/ca-certificates.crt \
        /usr/local/share/ca-certificates/build-host.crt >/dev/null
    buildah "${storage[@]}" commit --rm "$ctr" "$builder" >/dev/null
fi

# 2. The image, from the Dockerfile (crun fails on this machine's hybrid
#    cgroups: chroot isolation runs the RUN steps).
echo "image.sh: building $image from $base" >&2
buildah "${storage[@]}" bud \
    --isolation chroot \
    --pull-never \
    --layers \
    --build-arg "BASE_IMAGE=$base" \
    --build-arg "BUILDER_IMAGE=$builder" \
    --build-arg "VERSION=$version" \
    --tag "$image" \
    --file Dockerfile \
    .

# 3. Run-check: both binaries start (so every shared library they need is
#    in the image) and report the version, as the non-root user the image
#    declares. The image has no shell: only our binaries can run in it.
ctr="$(buildah "${storage[@]}" from --pull-never "$image")"
trap 'buildah "${storage[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
run() { buildah "${storage[@]}" run --isolation chroot "$ctr" -- "$@"; }
capture="$(run holdfast-capture --version)"
operator="$(run holdfast-operator --version)"
user="$(buildah "${storage[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$image")"
echo "image.sh: $capture; $operator; User $user" >&2
[[ "$capture" == *"$version"* && "$operator" == *"$version"* ]] || {
    echo "image.sh: the binaries do not report version $version" >&2
    exit 1
}
[[ "$user" == 65532:65532 ]] || {
    echo "image.sh: the image must run as 65532:65532, not User $user" >&2
    exit 1
}
crd="$(run holdfast-operator crd)"
[[ "$crd" == *"kind: CustomResourceDefinition"* ]] || {
    echo "image.sh: holdfast-operator crd printed no CRD" >&2
    exit 1
}
# A CA bundle where OpenSSL (librdkafka) and rustls look for it.
ctr_mnt="$(buildah "${storage[@]}" mount "$ctr")"
[[ -s "$ctr_mnt/etc/ssl/certs/ca-certificates.crt" && -L "$ctr_mnt/usr/lib/ssl/cert.pem" ]] || {
    echo "image.sh: no CA bundle in the image" >&2
    exit 1
}
buildah "${storage[@]}" umount "$ctr" >/dev/null
size="$(buildah "${storage[@]}" images --format '{{.Size}}' "$image" | head -1)"
echo "image.sh: $image ok ($size)"
