#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Live moves from the command line: `bmirror serve` exports a disk over NBD,
# fio (ioengine=nbd, crc32c verify headers) writes through it, and
# `bmirror move` moves the disk while fio runs, in active and background
# mode, to a local path and to NBD destinations (qemu-nbd, nbdkit memory).
# Afterwards fio's verify pass over the served disk finds every block it
# wrote, `bmirror verify` shows source-at-pivot == destination, and the
# link the server was started with names the destination.  Then faults:
# destinations behind nbdkit's error filter (1% and 100%) and delay
# filter, and a destination server killed mid-move: the move fails or
# retries per its policy, fio sees no error, and the source keeps every
# write.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires fio qemu-img qemu-nbd nbdkit nbdinfo
fio --enghelp 2>/dev/null | grep -qw nbd || skip_test "fio has no nbd engine"

SIZE=$((64 * MiB))

# ---- moves under fio, to a local path -----------------------------------
for mode in active background; do
	make_mixed_image "$T/src.raw"
	truncate -s "$SIZE" "$T/src.raw"
	ln -sfn "$T/src.raw" "$T/disk"
	rm -f "$T/dst.raw"
	start_serve "$T/disk" --link

	fio_write "$T/fio.out" &
	fio_pid=$!
	sleep 1
	run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/dst.raw" \
		--mode "$mode" --no-pivot --json
	grep -q '"event":"READY"' "$RUN_OUT" || fail "no READY event ($mode)"
	pass "move ($mode) reached READY while fio wrote"
	wait "$fio_pid" || { cat "$T/fio.out" >&2; fail "fio saw an error during the $mode move"; }
	pass "fio saw no error during the $mode move"

	run_ok "$BMIRROR" complete --control "$T/ctl.sock"
	run_ok "$BMIRROR" status --control "$T/ctl.sock" --json
	json_assert "$RUN_OUT" "d['image'] == '$T/dst.raw'"
	[[ $(readlink "$T/disk") == "$T/dst.raw" ]] || fail "the link does not name the destination"
	pass "pivot ($mode): the served image and the link are the destination"

	run_ok "$BMIRROR" verify "$T/src.raw" "$T/dst.raw"
	pass "source at the pivot == destination ($mode)"
	fio_verify "after the $mode move"
	pass "fio verify over the moved disk ($mode)"
	stop_serve
	run_ok qemu-img compare -f raw -F raw "$T/src.raw" "$T/dst.raw"
	pass "qemu-img compare source/destination ($mode)"
done

# ---- a pivoting move with --json summary and a progress-free run --------
make_mixed_image "$T/src.raw"
rm -f "$T/dst2.raw"
start_serve "$T/src.raw"
run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/dst2.raw" --mode active --json
last=$(tail -n 1 "$RUN_OUT")
echo "$last" > "$T/summary.json"
json_assert "$T/summary.json" "all(k in d for k in ('bytes_copied','elapsed_s','pivot_stall_us','mode'))"
json_assert "$T/summary.json" "d['mode'] == 'active' and d['bytes_copied'] > 0"
pass "move --json ends with the summary line"
run_ok "$BMIRROR" verify "$T/src.raw" "$T/dst2.raw"
stop_serve

# ---- NBD destinations ----------------------------------------------------
make_mixed_image "$T/src.raw"
truncate -s "$SIZE" "$T/src.raw"
start_serve "$T/src.raw"
truncate -s 0 "$T/qdst.raw"; truncate -s "$SIZE" "$T/qdst.raw"
qemu-nbd -f raw --socket="$T/q.sock" --persistent -x '' "$T/qdst.raw" &
qpid=$!
wait_for_socket "$T/q.sock"
fio_write "$T/fio.out" &
fio_pid=$!
sleep 1
run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "nbd+unix:///?socket=$T/q.sock" --mode active --json
wait "$fio_pid" || fail "fio saw an error during the move to qemu-nbd"
fio_verify "after the move to qemu-nbd"
pass "move to qemu-nbd under fio, then fio verify through the served disk"
stop_serve
kill "$qpid"; wait "$qpid" || true
run_ok fio "${FIO_COMMON[@]}" --filename="$T/qdst.raw" --ioengine=psync --verify_only --output="$T/fio-file.out"
pass "the qemu-nbd destination file holds fio's data"

make_mixed_image "$T/src.raw"
start_serve "$T/src.raw"
rm -f "$T/m.sock"
nbdkit --exit-with-parent -f -U "$T/m.sock" memory "$MIXED_SIZE" &
mpid=$!
wait_for_socket "$T/m.sock"
run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "nbd+unix:///?socket=$T/m.sock" --mode background --no-pivot
run_ok "$BMIRROR" cancel --control "$T/ctl.sock"
run_ok qemu-img compare -f raw "$T/src.raw" "nbd+unix:///?socket=$T/m.sock"
pass "cancel after READY leaves nbdkit memory a consistent copy"
kill "$mpid"; wait "$mpid" 2>/dev/null || true
stop_serve

# ---- a destination of the wrong size is refused before anything is written
make_mixed_image "$T/src.raw"
start_serve "$T/src.raw"
rm -f "$T/m.sock"
nbdkit --exit-with-parent -f -U "$T/m.sock" memory 1M &
mpid=$!
wait_for_socket "$T/m.sock"
expect_fail_with 1 "size|bytes" "$BMIRROR" move --control "$T/ctl.sock" --to "nbd+unix:///?socket=$T/m.sock"
kill "$mpid"; wait "$mpid" 2>/dev/null || true
pass "an NBD destination of another size is refused"
stop_serve

# ---- faults ----------------------------------------------------------------
fault_move() { # fault_move NAME POLICY EXPECT(ok|fail) FILTER FILTER-PARAMS...
	local name=$1 policy=$2 expect=$3 filter=$4
	shift 4
	make_mixed_image "$T/src.raw"
	truncate -s "$SIZE" "$T/src.raw"
	start_serve "$T/src.raw"
	rm -f "$T/f.sock"
	nbdkit --exit-with-parent -f -U "$T/f.sock" --filter="$filter" memory "$SIZE" "$@" &
	local fpid=$!
	wait_for_socket "$T/f.sock"
	fio_write "$T/fio.out" 2000 &
	local fio_pid=$!
	sleep 0.5
	# --no-pivot: the guest stays on the source, which must not notice.
	run "$BMIRROR" move --control "$T/ctl.sock" --to "nbd+unix:///?socket=$T/f.sock" \
		--mode active --on-error "$policy" --no-pivot --json
	if [[ $expect == ok ]]; then
		((RUN_RC == 0)) || { show_run move; fail "$name: the move should have reached READY"; }
		grep -q '"event":"READY"' "$RUN_OUT" || fail "$name: no READY"
	else
		((RUN_RC == 1)) || { show_run move; fail "$name: the move should have failed"; }
		grep -q '"event":"FAILED"' "$RUN_OUT" || fail "$name: no FAILED event"
	fi
	wait "$fio_pid" || { cat "$T/fio.out" >&2; fail "$name: the guest (fio) saw an error"; }
	if [[ $expect == ok ]]; then
		run_ok "$BMIRROR" cancel --control "$T/ctl.sock" --force
	fi
	run_ok "$BMIRROR" status --control "$T/ctl.sock" --json
	json_assert "$RUN_OUT" "d['image'] == '$T/src.raw'"
	fio_verify "$name"
	kill "$fpid" 2>/dev/null; wait "$fpid" 2>/dev/null || true
	stop_serve
	pass "$name: move $expect, fio saw no error and verifies"
}
fault_move "error filter 100%" report fail error error-pwrite-rate=100% error-pwrite=EIO
fault_move "error filter 1%, retry" retry ok error error-pwrite-rate=1% error-pwrite=EIO
fault_move "delay filter" report ok delay wdelay=5ms

# A destination server killed in the middle of the move.
make_mixed_image "$T/src.raw"
truncate -s "$SIZE" "$T/src.raw"
start_serve "$T/src.raw"
rm -f "$T/k.sock"
# Writes that never finish: the kill always lands in the middle.
nbdkit --exit-with-parent -f -U "$T/k.sock" --filter=delay memory "$SIZE" wdelay=60 &
kpid=$!
wait_for_socket "$T/k.sock"
fio_write "$T/fio.out" 2000 &
fio_pid=$!
"$BMIRROR" move --control "$T/ctl.sock" --to "nbd+unix:///?socket=$T/k.sock" \
	--mode active --json >"$T/move.out" 2>&1 &
move_pid=$!
sleep 1
kill -KILL "$kpid"
rc=0
wait "$move_pid" || rc=$?
((rc == 1)) || { cat "$T/move.out" >&2; fail "a move to a killed server must fail (got $rc)"; }
wait "$fio_pid" || fail "the guest saw an error when the destination died"
fio_verify "after the destination died"
run_ok "$BMIRROR" status --control "$T/ctl.sock" --json
json_assert "$RUN_OUT" "d['image'] == '$T/src.raw'"
stop_serve
pass "a destination killed mid-move: the move fails, the guest runs on"
