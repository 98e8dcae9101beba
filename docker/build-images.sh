#!/usr/bin/env bash
# Builds the images docker/compose.local.yml uses, without any image registry:
#   microservices/base:bookworm      Debian bookworm made with debootstrap and `docker import`
#   microservices/app:local          the base plus the four release binaries built on this host
#   microservices/postgres:15-local  the base plus Debian's postgresql-15, started like the
#                                    official postgres image
# What is current is skipped: the base image when present, the others when their label says they
# were built from this base and these files (binaries, Dockerfile, entrypoint). Needs root
# (debootstrap), a Docker engine, and the Debian mirror this host's apt uses.
# Usage: docker/build-images.sh [--rebuild]   (--rebuild drops the three images and the build cache)
# Build the binaries first: cargo build --release (CARGO_TARGET_DIR is honoured).
set -euo pipefail
cd "$(dirname "$0")/.."

base_image=microservices/base:bookworm
app_image=microservices/app:local
postgres_image=microservices/postgres:15-local
binaries=(distributor gateway kv-service notice-service)
release_dir=${CARGO_TARGET_DIR:-target}/release
# The classic builder: this needs nothing beyond the engine (no buildx plugin).
export DOCKER_BUILDKIT=0
cache_option=()

log() { echo "build-images: $*" >&2; }
die() { log "error: $*"; exit 1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
# docker build, quiet unless it fails (the classic builder also prints a deprecation notice).
# The image replaced by a rebuild is removed, unless a container still uses it.
quiet_build() {
    local tag=$1 output previous
    shift
    previous=$(docker image inspect -f '{{ .Id }}' "$tag" 2>/dev/null || true)
    if ! output=$(timeout 1200 docker build -q "${cache_option[@]}" -t "$tag" "$@" 2>&1); then
        echo "$output" >&2
        die "docker build of $tag failed"
    fi
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{ .Id }}' "$tag")" ]; then
        docker image rm "$previous" >/dev/null 2>&1 || true
    fi
}

scratch_dirs=()
cleanup() { [ ${#scratch_dirs[@]} -eq 0 ] || rm -rf --one-file-system "${scratch_dirs[@]}"; }
trap cleanup EXIT
scratch_dir() {
    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/build-images.XXXXXX")
    scratch_dirs+=("$dir")
    echo "$dir"
}

# The mirror apt uses on this host, so the image gets its packages from the same place (a local
# mirror or proxy keeps working); DEBIAN_MIRROR overrides it.
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }')
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" && / bookworm / && !/security/ {
                for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; exit } }')
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
    if image_exists "$base_image"; then
        log "$base_image exists, skipped"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root: run this script as root (or with sudo)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local mirror work rootfs started
    mirror=$(debian_mirror)
    work=$(scratch_dir)
    rootfs=$work/rootfs
    started=$(date +%s)
    log "debootstrap --variant=minbase bookworm from $mirror (a minute or more)"
    if ! timeout 1800 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
        tail -20 "$work/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
SOURCES
    # Docker supplies these at run time; the image carries no copy of the host's.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
    tar --numeric-owner -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["/bin/bash"]' \
            - "$base_image" >/dev/null
    log "$base_image built in $(($(date +%s) - started)) s"
}

# What an image was built from: the base image's id and the given files. Stored as a label, it
# tells whether an existing image is still current.
inputs_checksum() {
    { docker image inspect -f '{{ .Id }}' "$base_image"; sha256sum "$@"; } | sha256sum | cut -d' ' -f1
}
image_label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

build_postgres() {
    local checksum started
    checksum=$(inputs_checksum docker/postgres/*)
    if [ "$(image_label "$postgres_image" inputs.sha256)" = "$checksum" ]; then
        log "$postgres_image is up to date, skipped"
        return
    fi
    started=$(date +%s)
    log "building $postgres_image (apt-get install postgresql-15 inside the build)"
    quiet_build "$postgres_image" --label "inputs.sha256=$checksum" docker/postgres
    log "$postgres_image built in $(($(date +%s) - started)) s"
}

build_app() {
    local name missing=()
    for name in "${binaries[@]}"; do
        [ -x "$release_dir/$name" ] || missing+=("$release_dir/$name")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run cargo build --release first"
    local checksum
    checksum=$(inputs_checksum docker/build-images.sh docker/app/Dockerfile "${binaries[@]/#/$release_dir/}")
    if [ "$(image_label "$app_image" inputs.sha256)" = "$checksum" ]; then
        log "$app_image is up to date with these binaries, skipped"
        return
    fi
    local context started
    started=$(date +%s)
    context=$(scratch_dir)
    cp docker/app/Dockerfile "$context/"
    # Compressed debug sections keep the line tables for backtraces at a third of the size.
    local stage_pids=()
    for name in "${binaries[@]}"; do
        {
            objcopy --compress-debug-sections=zlib "$release_dir/$name" "$context/$name" 2>/dev/null ||
                cp "$release_dir/$name" "$context/$name"
        } &
        stage_pids+=($!)
    done
    local pid
    for pid in "${stage_pids[@]}"; do
        wait "$pid" || die "cannot copy the binaries into $context"
    done
    quiet_build "$app_image" --label "inputs.sha256=$checksum" "$context"
    log "$app_image built in $(($(date +%s) - started)) s"
}

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
if [ "${1:-}" = "--rebuild" ]; then
    # Children first: an image other images are built on cannot be removed.
    for image in "$app_image" "$postgres_image" "$base_image"; do
        docker image rm -f "$image" >/dev/null 2>&1 || true
    done
    cache_option=(--no-cache)
elif [ $# -gt 0 ]; then
    die "unknown argument $1 (usage: docker/build-images.sh [--rebuild])"
fi
build_base
build_postgres
build_app
