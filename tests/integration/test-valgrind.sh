#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# bmirror under valgrind's memcheck: create and info on raw, qcow2 and
# VHDX images, and copy and verify of raw ones.  Every command must exit
# as it would without valgrind, and valgrind must report no invalid
# access, bad free or leak (definite or possible).
#
# Undefined-value tracking is off (--undef-value-errors=no): the kernel
# fills read buffers through io_uring, which valgrind cannot see, so every
# byte read from an image would look uninitialised.
#
# Only single-threaded paths can run: valgrind (3.19) treats io_uring_enter
# as a call that does not block, so a thread waiting for completions keeps
# valgrind's big lock and a second thread that would produce them (the
# format engine's worker, the serve loop's thread) never runs: the process
# hangs (liburing issue 657).  Format conversions, serve and move are
# therefore covered by the ASan+UBSan and TSan builds instead.  Each
# command runs under a hard time limit, so such a hang fails the test
# rather than stalling CI.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires valgrind nbdinfo python3 cmp

VG=(timeout -s KILL 300 valgrind -q --error-exitcode=99 --leak-check=full
	--errors-for-leak-kinds=definite,possible --undef-value-errors=no)

# vg WHAT CMD...: run CMD under valgrind; it must exit 0 without reports.
vg() {
	local what=$1
	shift
	run "${VG[@]}" "$@"
	if ((RUN_RC != 0)); then
		show_run "$@"
		fail "$what: exit status $RUN_RC under valgrind (99: valgrind found errors, 137: hung)"
	fi
	pass "$what"
}

truncate -s 4M "$T/src.raw"
head -c 1M /dev/urandom | dd of="$T/src.raw" conv=notrunc status=none
head -c 64K /dev/urandom | dd of="$T/src.raw" bs=64K seek=40 conv=notrunc status=none

vg "copy raw -> raw" "$BMIRROR" copy "$T/src.raw" "$T/copy.raw"
cmp "$T/src.raw" "$T/copy.raw" || fail "the copy differs"
vg "verify raw = raw" "$BMIRROR" verify "$T/src.raw" "$T/copy.raw"
for f in raw qcow2 vhdx; do
	vg "create -f $f" "$BMIRROR" create -f "$f" "$T/new.$f" 8M
	vg "info $f (new)" "$BMIRROR" info --json "$T/new.$f"
	# A copy with data, made without valgrind.
	run_ok "$BMIRROR" copy -O "$f" "$T/src.raw" "$T/data.$f"
	vg "info $f (with data)" "$BMIRROR" info "$T/data.$f"
done
