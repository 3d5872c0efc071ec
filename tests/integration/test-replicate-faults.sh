#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Replication when things go wrong (docs/replication.md, "Faults"); the
# primary replicates over TCP+TLS through a proxy whose link can stall or
# be cut (tcp-proxy.py), with BLOCKMIRROR_REPL_TIMEOUT=2:
#   - a stalled link: cycles fail at the deadline, the RPO target is
#     reported missed, the guest's writes go on without waiting for it;
#     once the link is back, the next point equals the disk;
#   - the link cut in the middle of a cycle: the cycle fails, the next one
#     sends everything since the replica's latest point;
#   - a replica whose file system is full: the cycle fails naming it, the
#     replica keeps its latest point whole, the guest goes on; with space
#     again, replication resumes and the point equals the disk.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io python3
requires_root # a small tmpfs for the full replica

SIZE=$((16 * MiB))
CTL=$T/ctl.sock
NBD="nbd+unix:///?socket=$T/nbd.sock"
KEY=$T/keys.psk
printf 'bmirror:%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$KEY"
chmod 600 "$KEY"
export BLOCKMIRROR_REPL_TIMEOUT=2

head -c "$SIZE" /dev/urandom >"$T/disk.raw"
SERVE_EXTRA=(--track)
start_serve "$T/disk.raw"
start_replica rep --create --size "$SIZE"

python3 "$INTEG_DIR/tcp-proxy.py" "$T/proxy.port" 127.0.0.1 "${REPLICA_ADDR##*:}" &
PROXY=$!
for ((i = 0; i < 400; i++)); do
	[[ -s $T/proxy.port ]] && break
	kill -0 "$PROXY" 2>/dev/null || fail "tcp-proxy.py did not start"
	sleep 0.05
done
[[ -s $T/proxy.port ]] || fail "tcp-proxy.py did not listen within 20 s"
PROXY_ADDR=tcp:127.0.0.1:$(cat "$T/proxy.port")

# proxy_accepts: how many connections the proxy has accepted.
proxy_accepts() {
	if [[ -e $T/proxy.port.accepts ]]; then
		wc -l <"$T/proxy.port.accepts"
	else
		echo 0
	fi
}

run_ok "$BMIRROR" replicate --control "$CTL" --to "$PROXY_ADDR" --tls-psk "$KEY" \
	--interval 1 --rpo 3
wait_point 1

# latest_is_disk DIR: a cycle now; the replica's latest point equals the
# disk.
latest_is_disk() {
	run_ok "$BMIRROR" replicate sync --control "$CTL" --timeout 60
	run_ok qemu-img convert -f raw -O raw "$NBD" "$T/now.raw"
	run_ok qemu-img compare -q -F raw "$(point_image "$1" 0)" "$T/now.raw"
}

# guest_writes N BASE: N 64 KiB writes from BASE, each its own qemu-io;
# fails if one takes 5 s or more (a guest held by replication).
guest_writes() {
	local i t0 t1
	for ((i = 0; i < $1; i++)); do
		t0=$(date +%s%N)
		run_ok qemu-io -f raw -c "write -P $((i % 200 + 1)) $(($2 + i * 65536)) 64k" "$NBD"
		t1=$(date +%s%N)
		(((t1 - t0) < 5000000000)) || fail "a guest write took $(((t1 - t0) / 1000000)) ms"
	done
}

# ---- a stalled link ---------------------------------------------------------
kill -USR1 "$PROXY"
guest_writes 40 0
# A cycle meets its deadline (a begin within 2 s, or a commit caught by
# the stall within 8 s: 4 x BLOCKMIRROR_REPL_TIMEOUT), and the point grows
# older than the 3 s target.
wait_status "d['cycles_failed'] >= 1 and d['rpo_missed']"
run_ok "$BMIRROR" replicate status --control "$CTL" --json
json_assert "$RUN_OUT" "d['cycles_failed'] >= 1" "d['rpo_missed'] is True" \
	"d['bytes_behind'] >= 40 * 65536"
# Stopping while a cycle waits on the stalled link cuts it short, and a
# start against it leaves serve answering (hang checks, not timings).
t0=$(date +%s%N)
run_ok "$BMIRROR" replicate stop --control "$CTL"
t1=$(date +%s%N)
(((t1 - t0) < 5000000000)) || fail "replicate stop took $(((t1 - t0) / 1000000)) ms on a stalled link"
accepts=$(proxy_accepts)
"$BMIRROR" replicate --control "$CTL" --to "$PROXY_ADDR" --tls-psk "$KEY" \
	--interval 1 --rpo 3 >"$T/start.out" 2>&1 &
START=$!
# Once the start's connection waits on the stalled link (the proxy has
# accepted it), however slowly it got there.
for ((i = 0; i < 400; i++)); do
	(($(proxy_accepts) > accepts)) && break
	kill -0 "$START" 2>/dev/null || break
	sleep 0.05
done
(($(proxy_accepts) > accepts)) || ! kill -0 "$START" 2>/dev/null ||
	fail "replicate did not reach the proxy within 20 s"
t0=$(date +%s%N)
run_ok "$BMIRROR" status --control "$CTL" --json
t1=$(date +%s%N)
(((t1 - t0) < 2000000000)) || fail "serve took $(((t1 - t0) / 1000000)) ms to answer while replication started"
kill -HUP "$PROXY"
# Its first connection has a deadline of its own (2 s): a link back after
# it may have failed the start with a timeout, which is right; a start now
# must succeed.  Any other failure is one.
if ! wait "$START"; then
	grep -q 'no TLS handshake within' "$T/start.out" ||
		{ cat "$T/start.out" >&2; fail "replicate did not start once the link was back"; }
	info "the start timed out before the link came back: starting again"
	run_ok "$BMIRROR" replicate --control "$CTL" --to "$PROXY_ADDR" --tls-psk "$KEY" \
		--interval 1 --rpo 3
fi
latest_is_disk "$T/rep"
pass "a stalled link fails cycles at their deadline, the guest goes on, stop and start do not wait for it, and replication catches up"

# ---- the link cut mid-cycle ---------------------------------------------------
guest_writes 40 $((4 * MiB))
"$BMIRROR" replicate sync --control "$CTL" --timeout 60 >/dev/null 2>&1 &
SYNC=$!
sleep 0.05
kill -USR2 "$PROXY"
wait "$SYNC" || true # committed or not: the next cycle says
latest_is_disk "$T/rep"
pass "a link cut in the middle of a cycle: the next cycle sends what the replica lacks"

# ---- a full replica -------------------------------------------------------------
run_ok "$BMIRROR" replicate stop --control "$CTL"
stop_replica
mkdir "$T/small"
run_ok mount -t tmpfs -o size=$((SIZE + 6 * MiB)) tmpfs "$T/small"
start_replica small/rep --create --size "$SIZE"
# Cycles only when asked (the first one runs at once): no idle cycle may
# commit a point between FULL_AT and the write, however long that takes.
run_ok "$BMIRROR" replicate --control "$CTL" --to "$REPLICA_ADDR" --tls-psk "$KEY" \
	--interval 3600 --resync
wait_point 1
run_ok "$BMIRROR" replicate sync --control "$CTL" --json
FULL_AT=$(json_get "$RUN_OUT" point)
run_ok qemu-img convert -f raw -O raw "$NBD" "$T/before.raw"
# The whole disk again: a point's layer of 16 MiB does not fit in 6.  No
# cycle commits it: a sync fails (its cycles fail and are retried until
# its deadline).
run_ok qemu-io -f raw -c "write -P 0x61 0 $SIZE" "$NBD"
run "$BMIRROR" replicate sync --control "$CTL" --timeout 5 --json
((RUN_RC != 0)) || { show_run "$BMIRROR" replicate sync; fail "a point was committed onto a full replica"; }
wait_status "d['cycles_failed'] >= 1"
run_ok "$BMIRROR" replicate status --control "$CTL" --json
json_assert "$RUN_OUT" "d['cycles_failed'] >= 1" "d['point'] == $FULL_AT" \
	"'space' in d['last_error']"
run_ok qemu-img compare -q -F raw "$(point_image "$T/small/rep" 0)" "$T/before.raw"
guest_writes 4 0
pass "a full replica fails the cycle naming it, keeps its latest point whole, the guest goes on"
run_ok mount -o remount,size=$((4 * SIZE)) "$T/small"
latest_is_disk "$T/small/rep"
pass "with space again, replication resumes"

run_ok "$BMIRROR" replicate stop --control "$CTL"
stop_replica
kill "$PROXY"
stop_serve
run_ok umount "$T/small"
