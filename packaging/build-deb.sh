#!/usr/bin/env bash
# Build the connwatch .deb: build/deb/connwatch_<version>_<arch>.deb
#
# Run by `make deb` (after `make deps`, which builds the BPF object with
# `make bpf`). The package is built in a temporary copy of the tree, so the
# source tree stays clean; packaging/debian/ becomes debian/ in that copy.
#
# Environment: CONNWATCH_DEB_OUT  output directory (default build/deb)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${CONNWATCH_DEB_OUT:-$ROOT/build/deb}
BPF_OBJ=$ROOT/agent/connwatch/bpf/connwatch.bpf.o

die() { echo "build-deb: $*" >&2; exit 2; }

[ -f "$BPF_OBJ" ] || die "$BPF_OBJ is missing: run \`make bpf\` first"

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/agent/connwatch/__init__.py")
deb_version=$(dpkg-parsechangelog -l "$ROOT/packaging/debian/changelog" -S Version)
[ -n "$version" ] || die "cannot read __version__ from agent/connwatch/__init__.py"
[ "$version" = "$deb_version" ] || die "agent version $version != packaging/debian/changelog version $deb_version: add a changelog entry (dch -v $version)"
arch=$(dpkg --print-architecture)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/connwatch-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
src=$tmp/connwatch-$version
mkdir -p "$src"

# only what the package is built from; dashboards/ and docs/ may or may not
# have their generated files yet: the rules install whatever is there
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.egg-info' -cf - \
	agent pyproject.toml $(cd "$ROOT" && ls -d dashboards docs 2>/dev/null) | tar -C "$src" -xf -
cp -a "$ROOT/packaging/debian" "$src/debian"
# docs the package ships that do not exist yet are dropped from the list
( cd "$src" && for d in $(cat debian/connwatch.docs); do if [ -e "$d" ]; then echo "$d"; fi; done \
	> debian/connwatch.docs.new && mv debian/connwatch.docs.new debian/connwatch.docs )

( cd "$src" && dpkg-buildpackage -b -us -uc >"$tmp/build.log" 2>&1 ) || {
	tail -40 "$tmp/build.log" >&2
	die "dpkg-buildpackage failed (log above)"
}

deb=$tmp/connwatch_${version}_${arch}.deb
[ -f "$deb" ] || die "dpkg-buildpackage did not produce $(basename "$deb")"
mkdir -p "$OUT"
# atomic: a concurrent reader never sees a half-written package
cp "$deb" "$OUT/.$(basename "$deb").tmp.$$"
mv "$OUT/.$(basename "$deb").tmp.$$" "$OUT/$(basename "$deb")"
echo "$OUT/$(basename "$deb")"
