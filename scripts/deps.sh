#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Install, with apt-get, the Debian 12 packages that building blockmirror
# and running its tests need, when they are missing.  Sourced by demo.sh
# and test.sh; safe to run again (it installs nothing when all is there).
set -euo pipefail

BM_BUILD_PACKAGES=(
	gcc meson ninja-build pkg-config
	liburing-dev libnbd-dev libxxhash-dev libjansson-dev libgnutls28-dev check uuid-dev
	zlib1g-dev libzstd-dev
)
# The real peers the tests drive, and the sanitizer/fuzzing toolchain.
BM_TEST_PACKAGES=(
	qemu-utils nbdkit libnbd-bin fio python3 util-linux groff-base e2fsprogs
	clang libclang-rt-14-dev valgrind
)

bm_install_missing() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
			grep -q 'install ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	echo "Installing: ${missing[*]}"
	local sudo=()
	[ "$(id -u)" -eq 0 ] || sudo=(sudo)
	"${sudo[@]}" apt-get update -qq
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
		--no-install-recommends "${missing[@]}" >/dev/null
}

# Configure (once) and build into $1 with the remaining meson options.
bm_build() {
	local dir=$1; shift
	if [ ! -f "$dir/build.ninja" ]; then
		meson setup "$dir" "$@"
	fi
	ninja -C "$dir"
}
