#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# bmirror against NBD servers that lie, as the source or the destination
# of a copy and under `bmirror info` (lib/nbd.c is the client):
#   - a server that accepts and never says a word, and one that finishes
#     the handshake and then never answers: the timeout fires;
#   - sizes: 2^64 - 1, not a multiple of the minimum block size, a size
#     that changes between connections;
#   - block status with extents longer than asked for, zero-length,
#     for another context, or far too many;
#   - reads whose data chunk lies outside the request, or covers half of
#     it before saying DONE.
# Every command must end with one clear error line and exit status 1, in
# bounded time (no hang, no crash), or succeed with the right bytes; no
# request may reach past the size the server gave on that connection
# (the server logs "OUTSIDE" if one does).  The servers are
# nbd-hostile-server.py (python3, raw sockets) and nbdkit's eval plugin.

source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"
requires python3 nbdkit timeout

HOSTILE=$INTEG_DIR/nbd-hostile-server.py
SIZE=$((1 * MiB))
export BLOCKMIRROR_NBD_TIMEOUT=2
LIMIT=15 # seconds any one command may take (timeouts are 2 s)
HPID=

start_hostile() { # start_hostile MODE [SIZE]
	stop_hostile
	rm -f "$T/h.sock" "$T/h.log" "$T/h.log.data"
	python3 "$HOSTILE" "$T/h.sock" "$1" "${2:-$SIZE}" "$T/h.log" &
	HPID=$!
	wait_for_socket "$T/h.sock"
	URI="nbd+unix:///?socket=$T/h.sock"
}

stop_hostile() {
	if [[ -n $HPID ]]; then
		kill "$HPID" 2>/dev/null || true
		wait "$HPID" 2>/dev/null || true
		HPID=
	fi
}

# The server logged no request past the size it gave.
no_outside() {
	if grep -q OUTSIDE "$T/h.log"; then
		fail "$1: a request reached past the export: $(grep OUTSIDE "$T/h.log" | head -3)"
	fi
}

# bounded_fail WHAT PATTERN CMD...: exit status 1 with one error line
# matching PATTERN, within LIMIT seconds.
bounded_fail() {
	local what=$1 pattern=$2 t0 t1
	shift 2
	t0=$(date +%s)
	expect_fail_with 1 "$pattern" timeout "$LIMIT" "$@"
	t1=$(date +%s)
	((t1 - t0 < LIMIT)) || fail "$what: took $((t1 - t0)) s"
	pass "$what: $(head -c 200 "$RUN_ERR")"
}

python3 "$HOSTILE" "$T/pattern.raw" pattern-file "$SIZE" /dev/null
head -c "$SIZE" /dev/urandom >"$T/src.raw"

# ---- the control case: an honest server, both ways ----------------------
start_hostile honest
run_ok timeout "$LIMIT" "$BMIRROR" info "$URI"
grep -q "virtual size: $SIZE " "$RUN_OUT" || fail "info: $(cat "$RUN_OUT")"
run_ok timeout "$LIMIT" "$BMIRROR" copy "$URI" "$T/dst.raw"
cmp "$T/dst.raw" "$T/pattern.raw" || fail "copy from the honest server differs"
rm -f "$T/dst.raw"
run_ok timeout "$LIMIT" "$BMIRROR" copy -O raw "$T/src.raw" "$URI"
cmp "$T/h.log.data" "$T/src.raw" || fail "copy to the honest server differs"
no_outside "honest"
pass "an honest server works both ways"

# ---- servers that never answer -------------------------------------------
start_hostile silent
bounded_fail "info, silent server" "no answer from the server within 2 seconds" \
	"$BMIRROR" info "$URI"
bounded_fail "copy from a silent server" "no answer from the server" \
	"$BMIRROR" copy "$URI" "$T/dst.raw"
bounded_fail "copy to a silent server" "no answer from the server" \
	"$BMIRROR" copy -O raw "$T/src.raw" "$URI"

start_hostile silent-after-go
bounded_fail "copy from a server that stops answering" "no reply from the server for 2 seconds" \
	"$BMIRROR" copy "$URI" "$T/dst.raw"
[[ ! -e $T/dst.raw ]] || fail "a failed copy left its destination behind"
bounded_fail "copy to a server that stops answering" "no reply from the server for 2 seconds" \
	"$BMIRROR" copy -O raw "$T/src.raw" "$URI"
no_outside "silent-after-go"

# ---- lying sizes ------------------------------------------------------------
start_hostile size-huge
bounded_fail "info, size 2^64-1" "no valid size" "$BMIRROR" info "$URI"
bounded_fail "copy from size 2^64-1" "no valid size" "$BMIRROR" copy "$URI" "$T/dst.raw"
bounded_fail "copy to size 2^64-1" "no valid size" \
	"$BMIRROR" copy -O raw "$T/src.raw" "$URI"

start_hostile size-odd
bounded_fail "info, size not a multiple of the block size" \
	"not a multiple of its minimum block size" "$BMIRROR" info "$URI"
bounded_fail "copy from a size not a multiple of the block size" \
	"not a multiple of its minimum block size" "$BMIRROR" copy "$URI" "$T/dst.raw"
bounded_fail "copy to a size not a multiple of the block size" \
	"not a multiple of its minimum block size" \
	"$BMIRROR" copy -O raw "$T/src.raw" "$URI"

# The first connection is told SIZE, later ones twice that: each store
# keeps to what its own connection was told, and a destination of the
# wrong size is refused.
start_hostile size-flip
run timeout "$LIMIT" "$BMIRROR" copy "$URI" "$T/dst.raw"
((RUN_RC == 0 || RUN_RC == 1)) || { show_run copy; fail "copy from a size-changing server: status $RUN_RC"; }
no_outside "size-flip source"
rm -f "$T/dst.raw"
bounded_fail "copy to a destination of the wrong size" "the export holds $((2 * SIZE)) bytes, not $SIZE" \
	"$BMIRROR" copy -O raw "$T/src.raw" "$URI"
no_outside "size-flip destination"
pass "a size that changes between connections"

# ---- block status that lies -------------------------------------------------
# Longer than asked (and than the export), or far too many extents: what
# lies beyond the range is ignored and the copy is right.
for mode in bs-beyond bs-many; do
	start_hostile "$mode"
	run_ok timeout "$LIMIT" "$BMIRROR" copy "$URI" "$T/dst.raw"
	cmp "$T/dst.raw" "$T/pattern.raw" || fail "$mode: the copy differs"
	rm -f "$T/dst.raw"
	no_outside "$mode"
	pass "$mode: ignored past the range, copy correct"
done
# Nothing described (a zero length, or only another context): an error,
# not a loop asking again forever.
for mode in bs-zero bs-offset; do
	start_hostile "$mode"
	bounded_fail "$mode" "block status at offset 0: the server described nothing" \
		"$BMIRROR" copy "$URI" "$T/dst.raw"
	no_outside "$mode"
done

# nbdkit with a plugin that gives extents outside the request: nbdkit
# itself trims them; whatever reaches us must still give a right copy.
nbdkit -U "$T/k.sock" --exit-with-parent -P "$T/k.pid" eval \
	get_size="echo $SIZE" \
	pread="python3 '$HOSTILE' /dev/stdout pattern-file \$((\$4 + \$3)) /dev/null | tail -c \$3" \
	can_extents='exit 0' \
	extents="echo 0 1G; echo 1G 1G hole,zero" &
wait_for_socket "$T/k.sock"
run_ok timeout 60 "$BMIRROR" copy "nbd+unix:///?socket=$T/k.sock" "$T/dst.raw"
cmp "$T/dst.raw" "$T/pattern.raw" || fail "nbdkit extents past the end: the copy differs"
rm -f "$T/dst.raw"
kill "$(cat "$T/k.pid")" 2>/dev/null || true
pass "nbdkit extents past the end of the export"

# ---- reads that lie -----------------------------------------------------------
start_hostile read-beyond
bounded_fail "a read chunk outside the request" "read at offset 0" \
	"$BMIRROR" copy "$URI" "$T/dst.raw"
start_hostile read-short
# One request for the whole export (from an NBD server a copy asks for
# 256 KiB by default), so that half of it is SIZE / 2.
bounded_fail "a read answered for half its length" "the server sent $((SIZE / 2)) bytes of it" \
	"$BMIRROR" copy --request-size "$SIZE" "$URI" "$T/dst.raw"
[[ ! -e $T/dst.raw ]] || fail "a failed copy left its destination behind"
stop_hostile

pass "every lying server gave a clear, bounded error"
