#!/bin/sh
# Install a connwatch .deb and its dependencies (all from Debian) with apt.
#
# The one install procedure, shared by the container image
# (packaging/container/Containerfile) and the packaging test that installs the
# package into a clean debootstrapped bookworm (tests/packaging/test_deb.py).
#
# usage: install-deb.sh /absolute/path/to/connwatch_<version>_<arch>.deb
set -eu

deb=${1:?usage: install-deb.sh /path/to/connwatch.deb}
case $deb in
	/*) ;;
	*) deb=$(pwd)/$deb ;;  # apt takes a local package only as a path
esac

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "$deb"
