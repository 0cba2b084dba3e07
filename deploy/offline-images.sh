#!/usr/bin/env bash
# The compose stack's images on a host that reaches no image registry (neither nvcr.io nor Docker
# Hub) and whose containers reach no package index: `make images` runs this; then
# `TRITON_SERVER=pytriton docker compose up` starts them (compose finds the images built and pulls
# nothing). The compose tests build their images this way too (tests/compose/conftest.py).
#
#   deploy/offline-images.sh [STEP...]   the steps named, or all three in this order:
#     wheelhouse  every wheel the images install, hashes checked, into docker/wheelhouse/ (the
#                 Dockerfile installs from it with no index at all): requirements/image.txt (triton),
#                 image-adapter.txt (adapter), tritonserver.txt (the nvidia-pytriton server), each
#                 for the CPython and platform its lock was resolved for, whatever Python runs pip
#     base        the base image, BASE_IMAGE: when absent, the default local/debian-python:bookworm
#                 is made with debootstrap (root, a Debian mirror: DEBIAN_MIRROR; Debian 12's
#                 python3, python3-venv, libpython3.11 and haproxy) and `docker import`; any other
#                 name is pulled
#     build       `docker compose build` of docker-compose.yml (triton with TRITON_SERVER=pytriton,
#                 adapter) and of deploy/compose/replicas.yml's lb, all on BASE_IMAGE
#
#   PYTHON        runs `pip download` (default python3), with pip's own configuration (index, find-links)
#   TORCH_SOURCE  more pip options, where torch's CPU build comes from (the Makefile passes its own)
#   BASE_IMAGE    local/debian-python:bookworm; python:3.11-slim where Docker Hub is reachable
set -euo pipefail
cd "$(dirname "$0")/.."

LOCAL_BASE_IMAGE=local/debian-python:bookworm
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE_IMAGE}
PYTHON=${PYTHON:-python3}
TORCH_SOURCE=${TORCH_SOURCE:-}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELHOUSE=docker/wheelhouse

log() { echo "offline-images: $*" >&2; }
fail() { log "$*"; exit 1; }

# pip download options for the interpreter and platform a lock was resolved for (its uv header:
# `--python-version 3.11 --python-platform x86_64-manylinux_2_35`): wheels for the images' Python,
# not for the one running pip.
lock_target() {
    local lock=$1 header version platform arch glibc minor
    header=$(sed -n '2p' "$lock")
    version=$(sed -n 's/.*--python-version \([0-9]*\.[0-9]*\).*/\1/p' <<<"$header")
    platform=$(sed -n 's/.*--python-platform \([a-z0-9_]*-manylinux_2_[0-9]*\).*/\1/p' <<<"$header")
    [ -n "$version" ] && [ -n "$platform" ] \
        || fail "$lock: no --python-version / --python-platform ARCH-manylinux_2_N in its header (make lock writes them)"
    arch=${platform%%-*}
    glibc=${platform##*_}
    echo "--python-version $version --implementation cp --abi cp${version/./}"
    # pip takes the platforms literally: every manylinux tag up to the lock's glibc, legacy names too.
    for minor in $(seq 5 "$glibc"); do echo "--platform manylinux_2_${minor}_$arch"; done
    [ "$glibc" -ge 5 ] && echo "--platform manylinux1_$arch"
    [ "$glibc" -ge 12 ] && echo "--platform manylinux2010_$arch"
    [ "$glibc" -ge 17 ] && echo "--platform manylinux2014_$arch"
    return 0
}

download() {
    local lock=requirements/$1
    shift
    local target
    target=$(lock_target "$lock")
    # $target: lock_target's options, one word each
    "$PYTHON" -m pip download -q -d "$WHEELHOUSE" --only-binary=:all: --require-hashes $target "$@" -r "$lock"
}

wheelhouse() {
    log "downloading the images' locked wheels into $WHEELHOUSE/"
    mkdir -p "$WHEELHOUSE"
    # TORCH_SOURCE: pip options, split into words
    download image.txt $TORCH_SOURCE
    download image-adapter.txt
    download tritonserver.txt --no-deps
}

# debootstrap mounts proc and sys inside the tree; a failed run can leave them there.
remove_rootfs() {
    { grep " $rootfs/" /proc/mounts || true; } | cut -d" " -f2 | sort -r | xargs -r umount -l
    rm -rf --one-file-system "$work"
}

debootstrap_base() {
    [ "$(id -u)" = 0 ] || fail "making $BASE_IMAGE needs root (debootstrap, chroot): run \`sudo make images\`, or name a base image you have: make images BASE_IMAGE=python:3.11-slim"
    command -v debootstrap >/dev/null || fail "making $BASE_IMAGE needs debootstrap (apt-get install debootstrap)"
    log "making $BASE_IMAGE with debootstrap from $DEBIAN_MIRROR (a few minutes)"
    work=$(mktemp -d "${TMPDIR:-/tmp}/offline-base.XXXXXX")
    rootfs=$work/rootfs
    trap remove_rootfs EXIT
    debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$work/build.log" 2>&1 \
        || { tail -20 "$work/build.log" >&2; fail "debootstrap failed"; }
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    chroot "$rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends python3 python3-venv libpython3.11 haproxy && apt-get clean \
        && rm -rf /var/lib/apt/lists/*' >>"$work/build.log" 2>&1 \
        || { tail -20 "$work/build.log" >&2; fail "installing Python and haproxy into the base failed"; }
    : > "$rootfs/etc/resolv.conf"
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
    remove_rootfs
    trap - EXIT
}

base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE: present"
    elif [ "$BASE_IMAGE" = "$LOCAL_BASE_IMAGE" ]; then
        debootstrap_base
    else
        docker pull "$BASE_IMAGE"
    fi
}

build() {
    docker compose version >/dev/null 2>&1 || fail "docker compose v2 is not installed"
    log "building the images on $BASE_IMAGE"
    export TRITON_SERVER=pytriton TRITON_BASE_IMAGE=$BASE_IMAGE ADAPTER_BASE_IMAGE=$BASE_IMAGE LB_BASE_IMAGE=$BASE_IMAGE
    docker compose -f docker-compose.yml build
    docker compose -f deploy/compose/replicas.yml build lb
    log "ready: TRITON_SERVER=pytriton docker compose up"
    log "       TRITON_SERVER=pytriton docker compose -f deploy/compose/replicas.yml up --scale replica=3"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(wheelhouse base build)
for step in "${steps[@]}"; do
    case "$step" in
        wheelhouse | base | build) "$step" ;;
        *) fail "unknown step '$step' (wheelhouse, base, build)" ;;
    esac
done
