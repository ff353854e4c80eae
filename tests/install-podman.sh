#!/usr/bin/env bash
# Make podman ready for the container test (tests/tests/e2e/containers.rs) in DIR and print
# DIR on stdout:
#
#   tests/install-podman.sh [DIR]      (DIR defaults to /opt/datasaver-test-podman)
#
# There is no Docker engine and no image registry here, so: podman, buildah and runc from
# Debian's packages (with the CNI dnsname plugin, so containers resolve each other by name);
# a Debian bookworm base made with debootstrap from the machine's Debian
# mirror and imported as docker.io/library/debian:bookworm-slim, so deploy/Dockerfile's FROM
# resolves with --pull=never; DIR/containers.conf with runc, cgroupfs and explicit ulimits
# (crun and the default ulimits fail on these machines); images in DIR/store (overlay).
# Idempotent: about 60 s the first time, nothing afterwards.
set -euo pipefail

dir="${1:-/opt/datasaver-test-podman}"
log() { echo "install-podman: $*" >&2; }
sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi

# dnsname: containers on a podman (CNI) network find each other by name.
packages=(podman buildah runc debootstrap golang-github-containernetworking-plugin-dnsname)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
"${sudo[@]}" mkdir -p "$dir"
hard=$(ulimit -Hn)
printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n' \
    "$hard" "$hard" | "${sudo[@]}" tee "$dir/containers.conf" >/dev/null
export CONTAINERS_CONF="$dir/containers.conf"
podman=("${sudo[@]}" podman --root "$dir/store" --storage-driver overlay)
if ! "${podman[@]}" image exists docker.io/library/debian:bookworm-slim; then
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d /tmp/datasaver-rootfs.XXXXXX)
    trap '"${sudo[@]}" rm -rf "$rootfs" "$rootfs.log"' EXIT
    log "debootstrap bookworm from $mirror (about 40 s)"
    if ! "${sudo[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
        tail -n 30 "$rootfs.log" >&2
        exit 1
    fi
    rm -f "$rootfs.log"
    "${sudo[@]}" tar -C "$rootfs" -c . | "${podman[@]}" import - localhost/debian-base:bookworm >&2
    "${podman[@]}" tag localhost/debian-base:bookworm docker.io/library/debian:bookworm-slim
fi
log "podman ready in $dir"
echo "$dir"
