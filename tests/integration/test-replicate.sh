#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Continuous replication to a replica over TCP with TLS-PSK
# (docs/replication.md), against a guest (fio, crc32c-verified writes over
# NBD) that keeps writing:
#   - the first point is a full copy; later points carry only what changed,
#     and each equals the primary's disk at its instant (the guest stopped,
#     a cycle forced, the disk copied with qemu-img);
#   - a point is exported read-only over NBD and reads as its instant;
#     a test failover serves a writable overlay while replication goes on;
#   - a replica killed with kill -9 mid-stream comes back at a whole point
#     and replication resumes; the guest saw no error;
#   - a wrong key is refused with a message that says so;
#   - planned failover: the old primary refuses writes, the replica's disk
#     holds every write the guest had acknowledged (fio verifies it there),
#     and replicating back to the old disk sends only what changed since;
#   - unplanned failover to an older point, then the old primary (which
#     kept writing) comes back: a split brain is refused, naming the
#     divergent amount; with --discard-divergent it is resynced by digests,
#     sending about what differs.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io fio python3

SIZE=$((32 * MiB))
CTL=$T/ctl.sock
NBD="nbd+unix:///?socket=$T/nbd.sock"
KEY=$T/keys.psk
printf 'bmirror:%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$KEY"
chmod 600 "$KEY"

# at_instant FIO COPY: stop the guest, copy the disk once its writes in
# flight have landed (settled_copy), force a cycle (its point holds every
# write acknowledged so far), and export the replica's latest point, which
# pins it (retention would merge it away once the next point comes); the
# guest goes on.  Every point committed while the guest is stopped, since
# the forced one, equals the copy.  AT_POINT: the exported point; EXP_NBD,
# EXP_NAME: its export (unexport it when done).
at_instant() {
	local synced
	kill -STOP "$1" 2>/dev/null || true # fio may have finished its pass
	settled_copy "$NBD" "$2"
	run_ok "$BMIRROR" replicate sync --control "$CTL" --json
	synced=$(json_get "$RUN_OUT" point)
	run_ok "$BMIRROR" replica export "$T/rep" --point 0 --json
	kill -CONT "$1" 2>/dev/null || true
	AT_POINT=$(json_get "$RUN_OUT" point)
	EXP_NBD=$(json_get "$RUN_OUT" nbd)
	EXP_NAME=$(json_get "$RUN_OUT" export)
	((AT_POINT >= synced)) || fail "the latest point $AT_POINT is older than the sync's $synced"
}

# ---- set up: a replica of a new disk, a primary writing ------------------
head -c "$SIZE" /dev/urandom >"$T/disk.raw"
SERVE_EXTRA=(--track)
start_serve "$T/disk.raw"
start_replica rep --create --size "$SIZE" --keep 3 --every 1
REP_ADDR=$REPLICA_ADDR

run_ok "$BMIRROR" replicate --control "$CTL" --to "$REP_ADDR" --tls-psk "$KEY" \
	--interval 1 --json
wait_point 1
# The state says syncing until the first cycle has ended, a moment after
# its point is committed; then incremental cycles (sending) or none (idle).
wait_status "d['point'] >= 1 and d['state'] in ('idle', 'sending')"
run_ok "$BMIRROR" replicate status --control "$CTL" --json
json_assert "$RUN_OUT" "d['point'] >= 1" "d['bytes_sent'] >= $SIZE * 9 // 10"
pass "initial replication copies the disk over TCP with TLS"

# Application-consistent points: the server runs the freeze command right
# before the instant and the thaw command after; a failing freeze makes a
# crash-consistent point.
run_ok "$BMIRROR" replicate stop --control "$CTL"
run_ok "$BMIRROR" replicate --control "$CTL" --to "$REP_ADDR" --tls-psk "$KEY" \
	--interval 3600 --freeze-cmd "touch $T/froze" --thaw-cmd "touch $T/thawed"
run_ok "$BMIRROR" replicate sync --control "$CTL"
[[ -e $T/froze && -e $T/thawed ]] || fail "the freeze and thaw commands did not run"
run_ok "$BMIRROR" replica points "$T/rep" --json
json_assert "$RUN_OUT" "[p for p in d['points'] if p['latest']][0]['app_consistent'] is True"
run_ok "$BMIRROR" replicate stop --control "$CTL"
run_ok "$BMIRROR" replicate --control "$CTL" --to "$REP_ADDR" --tls-psk "$KEY" \
	--interval 3600 --freeze-cmd "exit 3"
run_ok "$BMIRROR" replicate sync --control "$CTL"
run_ok "$BMIRROR" replica points "$T/rep" --json
json_assert "$RUN_OUT" "[p for p in d['points'] if p['latest']][0]['app_consistent'] is False"
pass "application-consistent points through the freeze and thaw commands"

# A cycle carries what changed, no more: 1 MiB written, then a cycle (no
# timer cycle in between: the interval is an hour here).
run_ok qemu-io -f raw -c "write -P 0x3c $((5 * MiB)) 1M" "$NBD"
run_ok "$BMIRROR" replicate sync --control "$CTL" --json
run_ok "$BMIRROR" replicate status --control "$CTL" --json
json_assert "$RUN_OUT" "d['last_cycle_bytes'] == $MiB"
pass "a cycle sends only the granules written since the last point"
run_ok "$BMIRROR" replicate stop --control "$CTL"
run_ok "$BMIRROR" replicate --control "$CTL" --to "$REP_ADDR" --tls-psk "$KEY" \
	--interval 1

# One pass over the disk, about 14 s: fio_verify checks every block later.
fio "${FIO_COMMON[@]}" --thread --uri="$NBD" --do_verify=0 --rate_iops=600 \
	--output="$T/fio.out" >/dev/null 2>&1 &
FIO=$!
sleep 2
# The guest held: a point now is the disk as it is; exported (which pins
# it) before the guest goes on.
kill -0 "$FIO" || fail "fio ended within 2 s: $(cat "$T/fio.out")"
at_instant "$FIO" "$T/at1.raw"
P1=$AT_POINT
run_ok qemu-img compare -q -F raw "$(point_image "$T/rep" "$P1")" "$T/at1.raw"
pass "a point equals the disk at its instant while the guest writes"

# ---- exports and test failover --------------------------------------------
EXP_URI="nbds://bmirror@${EXP_NBD#tcp:}/$EXP_NAME?tls-psk-file=$KEY"
run_ok "$BMIRROR" verify "$EXP_URI" "$T/at1.raw"

run_ok "$BMIRROR" replica test-failover "$T/rep" --point "$P1" --json
TF_NBD=$(json_get "$RUN_OUT" nbd)
TF_NAME=$(json_get "$RUN_OUT" export)
mkdir -p "$T/qpsk"
cp "$KEY" "$T/qpsk/keys.psk"
TF_OPTS="driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${TF_NBD##*:},export=$TF_NAME,tls-creds=tls0"
TF_OBJ="tls-creds-psk,id=tls0,endpoint=client,dir=$T/qpsk,username=bmirror"
run_ok qemu-io --object "$TF_OBJ" --image-opts "$TF_OPTS" \
	-c "write -P 0x5a 0 1M" -c "read -P 0x5a 0 1M"
grep -q "Pattern verification failed" "$RUN_OUT" && fail "the test failover lost its write"
# Cycles commit while the point is exported and under test.
run_ok "$BMIRROR" replicate status --control "$CTL" --json
wait_point $(($(json_get "$RUN_OUT" point) + 2))
run_ok "$BMIRROR" replica test-discard "$T/rep" --point "$P1"
run_ok "$BMIRROR" verify "$EXP_URI" "$T/at1.raw"
run_ok "$BMIRROR" replica unexport "$T/rep" --point "$P1"
pass "a point exported over NBD reads as its instant, a test failover writes beside it, while cycles go on"

# ---- the replica dies mid-stream ------------------------------------------
kill -9 "$REPLICA_PID"
wait "$REPLICA_PID" 2>/dev/null || true
# Cycles fail meanwhile; the guest goes on.
wait_status "d['cycles_failed'] >= 1 or d['state'] == 'connecting'"
run_ok "$BMIRROR" replicate status --control "$CTL" --json
json_assert "$RUN_OUT" "d['cycles_failed'] >= 1 or d['state'] == 'connecting'"
LISTEN=$REP_ADDR start_replica rep
before=$(json_get "$RUN_OUT" point)
wait_point $((before + 1))
at_instant "$FIO" "$T/at2.raw"
run_ok qemu-img compare -q -F raw "$(point_image "$T/rep" "$AT_POINT")" "$T/at2.raw"
run_ok "$BMIRROR" replica unexport "$T/rep" --point "$AT_POINT"
pass "a replica killed with kill -9 comes back at a whole point and replication resumes"

# ---- a wrong key -----------------------------------------------------------
printf 'bmirror:%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$T/wrong.psk"
chmod 600 "$T/wrong.psk"
head -c "$((4 * MiB))" /dev/urandom >"$T/other.raw"
"$BMIRROR" serve --nbd "unix:$T/nbd2.sock" --control "$T/ctl2.sock" --track \
	"$T/other.raw" 2>"$T/serve2.err" &
S2=$!
wait_for_socket "$T/ctl2.sock"
expect_fail_with --names "refused the key" 1 "refused the key" \
	"$BMIRROR" replicate --control "$T/ctl2.sock" --to "$REP_ADDR" \
	--tls-psk "$T/wrong.psk"
kill -TERM "$S2"
wait "$S2" || true
pass "a replica with the wrong key is refused, saying so"

# ---- planned failover -------------------------------------------------------
wait "$FIO" || fail "fio failed while replication ran: $(cat "$T/fio.out")"
run_ok "$BMIRROR" replicate failover --control "$CTL" --json
PF=$(json_get "$RUN_OUT" point)
run qemu-io -f raw -c "write -P 0x11 0 4k" "$NBD"
grep -q "write failed" "$RUN_OUT" || fail "the old primary took a write after the failover"
run_ok qemu-img convert -f raw -O raw "$NBD" "$T/final.raw"
stop_serve
run_ok "$BMIRROR" replica status "$T/rep" --json
json_assert "$RUN_OUT" "d['role'] == 'primary'"
NEW=$(json_get "$RUN_OUT" image)
stop_replica
run_ok qemu-img compare -q -F raw "$NEW" "$T/final.raw"
start_serve "$NEW"
fio_verify "every acknowledged write is on the new primary"
pass "planned failover at point $PF: the old primary takes no writes, the new one holds every write"

# ---- reverse replication: only what changed since -------------------------
# A base lives in the replica's directory: the old disk moves there with
# its replication state and change record.
mkdir "$T/back"
mv "$T/disk.raw" "$T/disk.raw".bmirror-* "$T/back/"
start_replica back --create --base "$T/back/disk.raw" --keep 4
BACK_ADDR=$REPLICA_ADDR
run_ok qemu-io -f raw -c "write -P 0x77 $((8 * MiB)) 1M" "$NBD"
run_ok "$BMIRROR" replicate --control "$CTL" --to "$BACK_ADDR" --tls-psk "$KEY" \
	--interval 1 --json
wait_point $((PF + 1))
run_ok "$BMIRROR" replicate status --control "$CTL" --json
json_assert "$RUN_OUT" "d['bytes_sent'] <= 2 * $MiB"
info "reverse replication sent $(json_get "$RUN_OUT" bytes_sent) bytes for 1 MiB written"
run_ok qemu-img convert -f raw -O raw "$NBD" "$T/now.raw"
run_ok qemu-img compare -q -F raw "$(point_image "$T/back" 0)" "$T/now.raw"
pass "reverse replication sends only what changed since the failover"

# ---- unplanned failover, and the old primary's return ----------------------
# Cycles only when asked from now on: points A and B, then writes that no
# cycle sends, then the primary dies.
run_ok "$BMIRROR" replicate stop --control "$CTL"
run_ok "$BMIRROR" replicate --control "$CTL" --to "$BACK_ADDR" --tls-psk "$KEY" \
	--interval 3600 --json
run_ok qemu-io -f raw -c "write -P 0x21 $((1 * MiB)) 1M" "$NBD"
run_ok "$BMIRROR" replicate sync --control "$CTL" --json
PA=$(json_get "$RUN_OUT" point)
run_ok qemu-img convert -f raw -O raw "$NBD" "$T/atA.raw"
run_ok qemu-io -f raw -c "write -P 0x22 $((2 * MiB)) 1M" "$NBD"
run_ok "$BMIRROR" replicate sync --control "$CTL" --json
run_ok qemu-io -f raw -c "write -P 0x23 $((3 * MiB)) 1M" "$NBD"
kill -9 "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=
stop_replica

# The replica's operator promotes point A, not the latest.
LISTEN=$BACK_ADDR start_replica back
run_ok "$BMIRROR" replica promote "$T/back" --point "$PA" --json
json_assert "$RUN_OUT" "d['discarded_bytes'] >= $MiB"
NEW2=$(json_get "$RUN_OUT" image)
stop_replica
run_ok qemu-img compare -q -F raw "$NEW2" "$T/atA.raw"
pass "unplanned failover to an older point: the disk is that point, the bytes after it said"

# The old primary comes back as a replica; the new one replicates to it.
mkdir "$T/old"
mv "$NEW" "$NEW".bmirror-* "$T/old/"
start_replica old --create --base "$T/old/$(basename "$NEW")"
OLD_ADDR=$REPLICA_ADDR
start_serve "$NEW2"
expect_fail_with --names "split brain" 1 "split brain" \
	"$BMIRROR" replicate --control "$CTL" --to "$OLD_ADDR" --tls-psk "$KEY" \
	--interval 1
run_ok "$BMIRROR" replicate --control "$CTL" --to "$OLD_ADDR" --tls-psk "$KEY" \
	--interval 1 --discard-divergent --json
wait_point $((PA + 1))
run_ok "$BMIRROR" replicate status --control "$CTL" --json
# What differs: the writes at 2 MiB and 3 MiB the new line does not have.
json_assert "$RUN_OUT" "$MiB <= d['bytes_sent'] <= 3 * $MiB"
info "the resync sent $(json_get "$RUN_OUT" bytes_sent) bytes for 2 MiB that differed"
run_ok qemu-img compare -q -F raw "$(point_image "$T/old" 0)" "$T/atA.raw"
pass "after a split brain, a resync with --discard-divergent sends what differs"
run_ok "$BMIRROR" replicate stop --control "$CTL"
stop_serve
stop_replica
