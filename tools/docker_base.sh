#!/usr/bin/env bash
# Make the local Docker base image local/debian:bookworm from debootstrap, for machines that reach no image registry.
#
#   tools/docker_base.sh [IMAGE]        # default IMAGE: local/debian:bookworm
#
# Does nothing when the image exists. Otherwise builds a minbase Debian bookworm root file system with debootstrap
# (about 2 minutes, needs root and the debootstrap package), keeps it as a tarball in $INFLIGHT_CACHE (default
# ~/.cache/inflight) so a later run only imports it, and imports it with `docker import`.
# The mirror is the first Debian URI in /etc/apt/sources.list.d/ (or /etc/apt/sources.list); $DEBIAN_MIRROR overrides.
set -euo pipefail

image=${1:-local/debian:bookworm}
cache=${INFLIGHT_CACHE:-$HOME/.cache/inflight}
tarball=$cache/debian-bookworm-minbase.tar

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image exists"
    exit 0
fi

if [ ! -s "$tarball" ]; then
    mirror=${DEBIAN_MIRROR:-}
    if [ -z "$mirror" ]; then
        # deb822 files ("URIs: http://deb.debian.org/debian") or one-line ones ("deb http://... bookworm main")
        mirror=$({ cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
            | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n 1 | tr -d ' ' || true)
    fi
    if [ -z "$mirror" ]; then
        echo "no Debian mirror found in /etc/apt/sources.list.d/ or /etc/apt/sources.list; set DEBIAN_MIRROR" >&2
        exit 1
    fi
    command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }
    mkdir -p "$cache"
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    chmod 0755 "$rootfs"  # it becomes the image's /: mktemp's 0700 would lock every non-root user out
    echo "debootstrap --variant=minbase bookworm from $mirror (about 2 minutes)"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { echo "debootstrap failed; see $cache/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi

docker import "$tarball" "$image" >/dev/null
echo "$image imported from $tarball"
