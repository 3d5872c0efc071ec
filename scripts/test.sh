#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Run the whole test suite on a fresh Debian 12 machine: install what is
# missing, build (warnings are errors), run every suite (valgrind's test
# among them), run them again under AddressSanitizer + UBSan, the unit
# suites under ThreadSanitizer, and then every libFuzzer target for a
# while (FUZZ_SECONDS each, default 7, as many at a time as there are
# CPUs; 0 skips).
#
# With CI=true a test that would skip for a missing tool fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

bm_install_missing "${BM_BUILD_PACKAGES[@]}" "${BM_TEST_PACKAGES[@]}"

bm_build build -Dwerror=true
# The kill loop of test-crash.sh runs 12 rounds here (50 by default when
# run alone: CRASH_ITERATIONS=50); the crash recorder (unit crash-record)
# replays thousands of crash points more cheaply.
CRASH_ITERATIONS=${CRASH_ITERATIONS:-12} \
	meson test -C build --print-errorlogs "$@"

# AddressSanitizer + UBSan over everything (clang: its runtimes are the
# ones fuzz/ uses too).  The allocator may return NULL: tests check ENOMEM.
# The kill loops run their full counts in the build above; here fewer
# rounds (and one seed of the replica store's model) look for memory
# errors on the same paths, to keep CI short.
CC=clang bm_build build-asan -Dwerror=true -Db_sanitize=address,undefined \
	-Db_lundef=false -Dbuildtype=debug
CRASH_ITERATIONS=${CRASH_ITERATIONS:-8} \
QCOW2_CRASH_ITERATIONS=${QCOW2_CRASH_ITERATIONS:-8} \
CHAINS_KILLS=${CHAINS_KILLS:-5} \
BM_MODEL_SEEDS=${BM_MODEL_SEEDS:-2} \
BM_CRASH_POINTS=${BM_CRASH_POINTS:-200} \
BM_REPLICA_SEEDS=${BM_REPLICA_SEEDS:-1} \
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	meson test -C build-asan --print-errorlogs "$@"

# ThreadSanitizer over the unit suites where the disk, the job and the
# loop are driven from several threads, the replication channel's
# thread-per-connection test server, and replication end to end (its
# thread, the callers waiting on it, the replica's connection threads;
# the server's floods and the crash replayers are single-threaded and
# slow under it: the builds above run them).
CC=clang bm_build build-tsan -Dwerror=true -Db_sanitize=thread \
	-Db_lundef=false -Dbuildtype=debug
tsan_tests=(loop file format mirror mirror-errors pivot-crash nbd
	    mirror-scenarios chain state model snapshot checkpoint backup
	    repl-channel replication)
BM_MODEL_SEEDS=${BM_MODEL_SEEDS:-1} \
TSAN_OPTIONS=halt_on_error=1:allocator_may_return_null=1 \
	meson test -C build-tsan --print-errorlogs "${tsan_tests[@]}" "$@"

# Every fuzz target for FUZZ_SECONDS under ASan+UBSan, starting from its
# seed corpus (read-only: new inputs go to a scratch directory).  A crash,
# leak, sanitizer report or hang fails; the input is kept in
# build-fuzz/artifacts and printed.  The executions per target are
# printed at the end.
fuzz_seconds=${FUZZ_SECONDS:-7}
# fuzz_one NAME EXE: one target for fuzz_seconds; its log and exit status
# in build-fuzz/artifacts/NAME.{log,rc}.
fuzz_one() {
	local name=$1 exe=$2 work rc=0
	work=$(mktemp -d)
	ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		"$exe" -max_total_time="$fuzz_seconds" -timeout=30 \
		-print_final_stats=1 \
		-artifact_prefix=build-fuzz/artifacts/"$name"- \
		"$work" "fuzz/corpus/$name" >build-fuzz/artifacts/"$name".log \
		2>&1 || rc=$?
	rm -rf "$work"
	echo "$rc" >build-fuzz/artifacts/"$name".rc
}
if [ "$fuzz_seconds" -gt 0 ]; then
	CC=clang bm_build build-fuzz -Dfuzzing=true -Dtests=false \
		-Db_sanitize=address,undefined -Db_lundef=false -Dwerror=true
	mkdir -p build-fuzz/artifacts
	# The targets are single-threaded: as many at a time as there are
	# CPUs, each for its full time.
	jobs_max=$(nproc)
	names=()
	for exe in build-fuzz/fuzz/fuzz-*; do
		[ -x "$exe" ] && [ -f "$exe" ] || continue
		name=${exe##*/fuzz-}
		names+=("$name")
		echo "fuzz-$name: ${fuzz_seconds}s"
		while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
			wait -n || true
		done
		fuzz_one "$name" "$exe" &
	done
	wait
	summary=()
	for name in "${names[@]}"; do
		log=build-fuzz/artifacts/$name.log
		rc=$(cat build-fuzz/artifacts/"$name".rc)
		runs=$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -n 1)
		summary+=("fuzz-$name: ${runs:-?} executions in ${fuzz_seconds}s")
		if [ "$rc" -ne 0 ]; then
			tail -n 60 "$log"
			echo "fuzz-$name failed (exit $rc); inputs in build-fuzz/artifacts" >&2
			exit 1
		fi
	done
	printf '%s\n' "${summary[@]}"
fi
