#!/usr/bin/env bash
# Build nnserve's images with docker or podman: deploy/image.sh TARGET... (runtime, runtime-zoo, runtime-gpu).
#
#   ENGINE         docker or podman (default: podman if installed, else docker)
#   IMAGE VERSION  tags: $IMAGE:$VERSION-cpu, -cpu-zoo, -gpu (default nnserve, 0.1.0)
#   PYTHON_IMAGE   the CPU images' base (default python:3.11.14-slim-bookworm). When it cannot be pulled (no
#                  registry reachable) and mmdebstrap is installed, a stand-in is built from Debian bookworm's
#                  packages (python 3.11 in a venv at /usr/local) and used instead; the build says so.
#   TORCH_WHEELS   a folder of CPU torch wheels for the zoo stage (default $PIP_FIND_LINKS); without it the
#                  zoo stage downloads torch's default wheel, a CUDA build of several GB.
#
# Under podman: `--format docker` (the OCI format drops HEALTHCHECK), the host's network, the host's CA bundle
# mounted where pip reads it (a proxy's CA), and CONTAINERS_CONF=deploy/podman/containers.conf unless set.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-nnserve}
VERSION=${VERSION:-0.1.0}
ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
DEBIAN_BASE=localhost/nnserve-python-debian:3.11-bookworm
CA=/etc/ssl/certs/ca-certificates.crt
command -v "$ENGINE" >/dev/null || { echo "image.sh: $ENGINE is not installed (ENGINE=docker or podman)" >&2; exit 2; }

say() { echo "image.sh: $*" >&2; }

debian_base() {  # a python:3.11-slim-bookworm stand-in from Debian's packages: no registry needed
    if [ -z "${REBASE:-}" ] && $ENGINE image inspect "$DEBIAN_BASE" >/dev/null 2>&1; then return; fi
    command -v mmdebstrap >/dev/null || { say "no registry and no mmdebstrap: apt-get install mmdebstrap"; exit 1; }
    local tar; tar=$(mktemp --suffix=.tar)
    local sources=/etc/apt/sources.list.d/debian.sources
    [ -f "$sources" ] || sources=""
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        --customize-hook='chroot "$1" python3 -m venv /usr/local' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        bookworm "$tar" $sources
    $ENGINE import --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tar" "$DEBIAN_BASE" >/dev/null
    rm -f "$tar"
}

python_image() {  # the base the CPU images are built on, printed
    if [ -n "${PYTHON_IMAGE:-}" ]; then echo "$PYTHON_IMAGE"; return; fi
    local upstream=docker.io/library/python:3.11.14-slim-bookworm
    if $ENGINE image inspect "$upstream" >/dev/null 2>&1 || $ENGINE pull -q "$upstream" >/dev/null 2>&1; then
        echo "$upstream"
        return
    fi
    say "cannot pull $upstream: using its stand-in $DEBIAN_BASE, built from Debian's packages if missing"
    debian_base
    echo "$DEBIAN_BASE"
}

build() {  # TARGET TAG
    local args=(-f deploy/Dockerfile --target "$1" -t "$2")
    if [ "$ENGINE" = podman ]; then
        export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
        args+=(--format docker --network host)
        if [ -f "$CA" ]; then
            args+=(-v "$CA:$CA:ro" -v "$CA:/usr/local/lib/python3.11/site-packages/pip/_vendor/certifi/cacert.pem:ro")
        fi
    fi
    if [ "$1" != runtime-gpu ]; then args+=(--build-arg "PYTHON_IMAGE=$BASE"); fi
    local wheels=${TORCH_WHEELS:-${PIP_FIND_LINKS:-}}
    if [ "$1" = runtime-zoo ] && [ -n "$wheels" ]; then
        if [ "$ENGINE" = podman ]; then
            args+=(-v "$wheels:/torch-wheels:ro" --build-arg PIP_FIND_LINKS=/torch-wheels)
        else
            say "TORCH_WHEELS is used under podman only (docker build mounts no folder): torch comes from the index"
        fi
    fi
    local start=$SECONDS
    $ENGINE build "${args[@]}" .
    say "built $2 in $((SECONDS - start)) s, $($ENGINE image inspect --format '{{.Size}}' "$2") bytes"
}

[ $# -gt 0 ] || set -- runtime runtime-zoo
if [ "$ENGINE" = podman ]; then export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}; fi
BASE=$(python_image)
for target in "$@"; do
    case $target in
        runtime) build runtime "$IMAGE:$VERSION-cpu" ;;
        runtime-zoo) build runtime-zoo "$IMAGE:$VERSION-cpu-zoo" ;;
        runtime-gpu) build runtime-gpu "$IMAGE:$VERSION-gpu" ;;
        *) say "unknown target $target (runtime, runtime-zoo, runtime-gpu)"; exit 2 ;;
    esac
done
