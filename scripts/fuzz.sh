#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# One libFuzzer campaign by hand: bash scripts/fuzz.sh TARGET [SECONDS]
#
# Builds build-fuzz if needed (clang, ASan+UBSan, as scripts/test.sh
# does), then runs fuzz/fuzz-TARGET for SECONDS (default 3600) on one
# core, starting from fuzz/corpus/TARGET.  The corpus stays read-only:
# new inputs go to a scratch directory (kept, and printed, for a later
# -merge=1; see fuzz/README.md).  Crashes, leaks and timeouts are kept in
# build-fuzz/artifacts/TARGET-*.  At the end: executions, executions per
# second (wall and CPU) and coverage.  FUZZ_ARGS adds libFuzzer options
# (-fork=N, ...); FUZZ_BUILD names another build directory than
# build-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
	echo "usage: $0 TARGET [SECONDS]" >&2
	exit 2
fi
target=$1
seconds=${2:-3600}
build=${FUZZ_BUILD:-build-fuzz}
case $seconds in
'' | *[!0-9]*)
	echo "$0: SECONDS must be a number" >&2
	exit 2
	;;
esac
if [ ! -d "fuzz/corpus/$target" ]; then
	echo "$0: no target '$target' (fuzz/corpus/$target is missing)" >&2
	exit 2
fi

if [ ! -f "$build/build.ninja" ]; then
	CC=clang meson setup "$build" -Dfuzzing=true -Dtests=false \
		-Db_sanitize=address,undefined -Db_lundef=false -Dwerror=true
fi
ninja -C "$build" "fuzz/fuzz-$target"

mkdir -p "$build/artifacts"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-$target.XXXXXX")
log=$build/artifacts/$target.log
echo "fuzz-$target: ${seconds}s, new inputs in $scratch, log in $log"
rc=0
start=$(date +%s)
# The allocator may return NULL: the code under test checks ENOMEM.
# shellcheck disable=SC2086
ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	"$build/fuzz/fuzz-$target" -max_total_time="$seconds" -timeout=30 \
	-max_len=65536 -print_final_stats=1 \
	-artifact_prefix="$build/artifacts/$target-" ${FUZZ_ARGS:-} \
	"$scratch" "fuzz/corpus/$target" 2>&1 | tee "$log" ||
	rc=$?

elapsed=$(($(date +%s) - start))
# The fuzzer's CPU time (user + system), from the shell's children.
times >"$log.times"
cpu=$(tail -n 1 "$log.times" | awk '{
	n = 0
	for (i = 1; i <= 2; i++) {
		split($i, t, /[ms]/)
		n += t[1] * 60 + t[2]
	}
	printf "%.0f", n
}')
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
time=$(sed -n 's/^stat::\(average_exec_per_sec\): *//p' "$log" | tail -n 1)
last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
cov=$(printf '%s\n' "$last" | sed -n 's/.* cov: \([0-9]*\).*/\1/p')
ft=$(printf '%s\n' "$last" | sed -n 's/.* ft: \([0-9]*\).*/\1/p')
echo
per_cpu=?
if [ -n "${runs:-}" ] && [ "$cpu" -gt 0 ]; then
	per_cpu=$((runs / cpu))
fi
echo "fuzz-$target: ${runs:-?} executions in ${elapsed}s" \
	"(${time:-?}/s; ${cpu}s CPU, $per_cpu per CPU-second)," \
	"cov ${cov:-?} edges, ft ${ft:-?} features," \
	"$(find "$scratch" -type f | wc -l) new inputs in $scratch"
if [ "$rc" -ne 0 ]; then
	echo "fuzz-$target failed (exit $rc); inputs in $build/artifacts" >&2
	ls -l "$build/artifacts/$target"-* 2>/dev/null >&2 || true
fi
exit "$rc"
