#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Run the whole test suite on a fresh Debian 12 machine: install what is
# missing, build (warnings are errors), run every suite, then run the unit
# and integration suites again under AddressSanitizer + UBSan.
#
# With CI=true a test that would skip for a missing tool fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

bm_install_missing "${BM_BUILD_PACKAGES[@]}" "${BM_TEST_PACKAGES[@]}"

bm_build build -Dwerror=true
meson test -C build --print-errorlogs "$@"

# AddressSanitizer + UBSan over everything (clang: its runtimes are the
# ones fuzz/ uses too).  The allocator may return NULL: tests check ENOMEM.
CC=clang bm_build build-asan -Dwerror=true -Db_sanitize=address,undefined \
	-Db_lundef=false -Dbuildtype=debug
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	meson test -C build-asan --print-errorlogs "$@"

# ThreadSanitizer over the unit suites: the disk, the job and the loop
# are driven from several threads there.
CC=clang bm_build build-tsan -Dwerror=true -Db_sanitize=thread \
	-Db_lundef=false -Dbuildtype=debug
TSAN_OPTIONS=halt_on_error=1:allocator_may_return_null=1 \
	meson test -C build-tsan --print-errorlogs --suite unit "$@"
