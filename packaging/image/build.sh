#!/usr/bin/env bash
# Build a container image holding one release binary and nothing else it does not need: no base
# image, no shell, no package manager. The binary's shared libraries (glibc and friends, as `ldd`
# lists them) are copied from this host into a staging root with a minimal /etc/passwd (uid 10001
# "delegate"), /etc/group and /tmp; the Dockerfile is FROM scratch plus a COPY of that root. No
# registry is contacted.
#
#   packaging/image/build.sh [--bin delegate|delegate-cp] [--tag TAG]
#
#   --bin delegate     the agent (default), Dockerfile;        default tag delegate-agent:local
#   --bin delegate-cp  the control plane, Dockerfile.controlplane; default tag delegate-cp:local
#
# Prints the tag on the last line of stdout. Honours CARGO_TARGET_DIR; set DELEGATE_SKIP_BUILD=1 to
# use an already built release binary as is.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."

bin=delegate
tag=
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin=${2:?--bin needs a value}; shift 2 ;;
        --tag) tag=${2:?--tag needs a value}; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$bin" in
    delegate) package=delegate-agent; dockerfile=Dockerfile; tag=${tag:-delegate-agent:local}
              state_name=delegate ;;
    delegate-cp) package=delegate-controlplane; dockerfile=Dockerfile.controlplane
                 tag=${tag:-delegate-cp:local}; state_name=delegate-cp ;;
    *) echo "--bin must be delegate or delegate-cp, got $bin" >&2; exit 2 ;;
esac

target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [ "${DELEGATE_SKIP_BUILD:-0}" != 1 ]; then
    nice -n 10 cargo build --release -p "$package" --bin "$bin" >&2
fi
binary=$target_dir/release/$bin
[ -x "$binary" ] || { echo "$binary not found: build it first" >&2; exit 1; }
version=$(cargo metadata --format-version 1 --no-deps |
    grep -o "\"name\":\"$package\",\"version\":\"[^\"]*\"" | sed 's/.*"version":"\([^"]*\)"/\1/')

stage=$(mktemp -d "${TMPDIR:-/tmp}/delegate-image.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/rootfs
# The state directory is staged apart: the Dockerfile copies it with --chown into /var/lib, which
# the root file system already holds (so only the directory itself changes owner).
mkdir -p "$root/usr/bin" "$root/etc" "$root/tmp" "$root/var/lib" "$stage/state/$state_name"
install -m 0755 "$binary" "$root/usr/bin/$bin"

# Shared libraries, at the paths the dynamic loader looks for them (the loader itself included).
if ldd "$binary" >"$stage/ldd.txt" 2>&1; then
    for lib in $(grep -o '/[^ ]*' "$stage/ldd.txt" | sort -u); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
elif ! grep -q 'not a dynamic executable\|statically linked' "$stage/ldd.txt"; then
    cat "$stage/ldd.txt" >&2
    exit 1
fi

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
delegate:x:10001:10001:Delegate:/var/lib/delegate:/sbin/nologin
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
delegate:x:10001:
GROUP
# Host names from /etc/hosts (which Docker writes) first, then DNS (compose/k8s service names).
echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"
chmod 0700 "$stage/state/$state_name"

cp "$here/$dockerfile" "$stage/Dockerfile"
docker build --quiet --build-arg "VERSION=$version" \
    -t "$tag" "$stage" >&2
echo "$tag"
