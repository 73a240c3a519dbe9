#!/usr/bin/env bash
# Build the connwatch container image with buildah, without any registry.
#
#   build-image.sh ROOTFS_TAR DEB TAG
#
# ROOTFS_TAR  a Debian bookworm root filesystem as a tar whose apt sources
#             reach a Debian mirror (`make image` passes the packaging
#             tests' cached debootstrap --variant=minbase root)
# DEB         the connwatch .deb (`make deb`)
# TAG         the image name to give the result, e.g. localhost/connwatch:0.1.0
#
# 1. The tarball becomes the base image localhost/connwatch-base:bookworm-<hash>
#    (also tagged localhost/connwatch-base:bookworm), unless it exists.
# 2. packaging/container/Containerfile is built on it (BASE_IMAGE build
#    argument) from a build context that holds only what the Containerfile
#    copies: packaging/install-deb.sh and the .deb. Its RUN reaches the mirror
#    through the host's network.
# The image is labelled with the hash of every input (base image, Containerfile,
# install script, .deb); an image with the same label is reused instead of
# rebuilt. Prints the image id on the last line.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CONTAINERFILE=$ROOT/packaging/container/Containerfile
INSTALL_SCRIPT=$ROOT/packaging/install-deb.sh
LABEL=org.connwatch.image.inputs

die() { echo "build-image: $*" >&2; exit 2; }

[ $# -eq 3 ] || die "usage: build-image.sh ROOTFS_TAR DEB TAG"
rootfs=$1 deb=$2 tag=$3
[ -f "$rootfs" ] || die "$rootfs: no such root filesystem tarball"
[ -f "$deb" ] || die "$deb: no such package (make deb)"
command -v buildah >/dev/null || die "buildah is not installed (make apt-image)"

sha() { sha256sum "$@" | cut -c1-64; }

base=localhost/connwatch-base:bookworm-$(sha "$rootfs" | cut -c1-16)
if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
	echo "build-image: importing $rootfs as $base" >&2
	ctr=$(buildah from --quiet scratch)
	trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
	# the archive's numeric owners and modes are kept
	buildah add --quiet "$ctr" "$rootfs" / >/dev/null
	buildah config --cmd '["/bin/bash"]' \
		--label org.opencontainers.image.description="Debian bookworm minbase (debootstrap), connwatch's base" "$ctr"
	buildah commit --quiet --rm "$ctr" "$base" >/dev/null
	trap - EXIT
fi
buildah tag "$base" localhost/connwatch-base:bookworm

inputs=$( { buildah inspect --type image --format '{{.FromImageID}}' "$base"; \
	sha "$CONTAINERFILE" "$INSTALL_SCRIPT" "$deb"; } | sha256sum | cut -c1-64)
cached=$(buildah images --noheading --no-trunc --format '{{.ID}}' --filter "label=$LABEL=$inputs" | head -1)
if [ -n "$cached" ]; then
	cached=${cached#sha256:}
	echo "build-image: inputs unchanged, reusing ${cached:0:12}" >&2
	buildah tag "$cached" "$tag"
	echo "$cached"
	exit 0
fi

context=$(mktemp -d "${TMPDIR:-/tmp}/connwatch-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/packaging"
cp "$INSTALL_SCRIPT" "$context/packaging/install-deb.sh"
cp "$deb" "$context/$(basename "$deb")"

# runc: bookworm's crun 1.8 refuses hybrid cgroup hosts (v1 and v2 both mounted)
buildah build --quiet --runtime runc --network host --layers=false \
	--file "$CONTAINERFILE" \
	--build-arg BASE_IMAGE="$base" \
	--build-arg CONNWATCH_DEB="$(basename "$deb")" \
	--label "$LABEL=$inputs" \
	--tag "$tag" "$context" >&2
# what earlier runs built for other inputs: images the new one took the tag
# from, and bases of older root tarballs (kept while a tagged image uses them)
for old in $(buildah images --noheading --no-trunc --format '{{.ID}}' --filter dangling=true --filter "label=$LABEL"); do
	buildah rmi "$old" >/dev/null 2>&1 || true
done
for old in $(buildah images --noheading --format '{{.Name}}:{{.Tag}}' localhost/connwatch-base); do
	case $old in "$base" | localhost/connwatch-base:bookworm) ;; *) buildah rmi "$old" >/dev/null 2>&1 || true ;; esac
done
buildah inspect --type image --format '{{.FromImageID}}' "$tag"
