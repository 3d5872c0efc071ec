#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Backups of a served disk into NBD exports (docs/backup.md, "An NBD
# target"), while fio writes to the disk:
#   - full and incremental points into one qemu-nbd export of a raw file
#     (forever incremental: the file equals each point's instant copy in
#     turn; a full point over an older one zeroes what is zero now), and
#     into a fresh qcow2 overlay per point served by qemu-nbd
#     (a chain on the remote side: every overlay still equals its instant);
#   - the catalogue (--catalog): list says which points are superseded,
#     verify rereads the newest point from its export and names damage,
#     restore takes the newest point and refuses a superseded one;
#   - every step is an event on the control socket, in order;
#   - fio never sees an error and verifies every write it made;
#   - then a full target (nbdkit's full plugin; an sh plugin failing
#     writes half way into the raw file), a target killed half way: clear
#     errors naming the target, no point recorded, verify and restore say
#     the export was partly overwritten, and the next point is whole; the
#     served disk goes on;
#   - healing by digests (an image without a change record) after a point
#     that failed half way into the export rewrites every granule.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io qemu-nbd nbdkit fio python3 cmp

SIZE=$((32 * MiB))
CTL=$T/ctl.sock
MAIN="nbd+unix:///?socket=$T/nbd.sock"
CAT=$T/catalog        # points in the raw export
CHAIN=$T/chain        # points in per-point overlays
export_uri() { printf 'nbd+unix:///?socket=%s' "$T/$1.sock"; }
# fio keeps to the disk's first 24 MiB (its verify too: fio_verify uses
# FIO_COMMON, and the last --size wins); the rest is this script's.
FIO_COMMON+=(--size=$((24 * MiB)))
TAIL=$((24 * MiB))

# export_start NAME CMD...: a server on $T/NAME.sock (EXPORT_PID).
EXPORT_PID=
export_start() {
	local name=$1
	shift
	rm -f -- "$T/$name.sock"
	"$@" 2>"$T/$name.err" &
	EXPORT_PID=$!
	wait_for_socket "$T/$name.sock"
}
export_stop() {
	kill "$EXPORT_PID" 2>/dev/null || true
	wait "$EXPORT_PID" 2>/dev/null || true
	EXPORT_PID=
}
# wait_for_file FILE PID: until FILE exists or PID ends (60 s); whether
# it exists.
wait_for_file() {
	local i
	for ((i = 0; i < 1200; i++)); do
		[[ -e $1 ]] && return 0
		kill -0 "$2" 2>/dev/null || break
		sleep 0.05
	done
	[[ -e $1 ]]
}
# at_instant COPY OUT ARGS...: backup_at_instant, fio stopped, after 64
# KiB of a new pattern written at a new place past TAIL (where fio never
# writes): every point has a change since the one before, however early
# fio ends.  fio may have written its every block already on a slow
# machine: then a stand-in is stopped.
N_AT=0
at_instant() {
	local f=$FIO
	N_AT=$((N_AT + 1))
	kill -STOP "$FIO" 2>/dev/null || { sleep 600 & f=$!; }
	run_ok qemu-io -f raw -c "write -P $((0x60 + N_AT)) $((TAIL + N_AT * MiB)) 64k" "$MAIN"
	backup_at_instant "$f" "$@"
	[[ $f == "$FIO" ]] || { kill "$f"; wait "$f" 2>/dev/null || true; }
}
# A target that gives out half way: FILE served on $T/NAME.sock by nbdkit's
# sh plugin (one request at a time; EXPORT_PID); the first N writes go
# through, then $T/NAME.held is made, and that write and all after it
# fail with ENOSPC (MODE enospc), or wait until nbdkit has gone (a minute
# at most; MODE hold).  target_start NAME FILE N MODE.
cat >"$T/target.sh" <<'EOF'
#!/bin/sh
case $1 in
get_size) stat -Lc %s "$TARGET_FILE" ;;
can_write) exit 0 ;;
pread) exec dd if="$TARGET_FILE" iflag=skip_bytes,count_bytes skip="$4" \
	count="$3" bs=64K status=none ;;
pwrite)
	if [ "$(stat -c %s "$TARGET.writes")" -lt "$TARGET_N" ]; then
		printf x >>"$TARGET.writes"
		exec dd of="$TARGET_FILE" oflag=seek_bytes seek="$4" conv=notrunc \
			iflag=fullblock,count_bytes count="$3" bs=64K status=none
	fi
	echo "$tmpdir" >"$TARGET.tmpdir"
	: >"$TARGET.held"
	if [ "$TARGET_MODE" = enospc ]; then
		echo 'ENOSPC the target is full' >&2
		exit 1
	fi
	i=0
	while kill -0 "$PPID" 2>/dev/null && [ $i -lt 1200 ]; do
		sleep 0.05
		i=$((i + 1))
	done
	exit 1 ;;
*) exit 2 ;;
esac
EOF
chmod +x "$T/target.sh"
target_start() {
	rm -f -- "$T/$1.held" "$T/$1.tmpdir"
	: >"$T/$1.writes"
	TARGET=$T/$1 TARGET_FILE=$2 TARGET_N=$3 TARGET_MODE=$4 export_start "$1" \
		nbdkit -f --exit-with-parent -U "$T/$1.sock" sh "$T/target.sh"
}
# points_in DIR: the numbers of the points recorded there.
points_in() { (cd -- "$1" && ls -- *.json 2>/dev/null | tr '\n' ' '); }

head -c "$SIZE" /dev/urandom >"$T/disk.raw"
truncate -s "$SIZE" "$T/export.raw"
SERVE_EXTRA=(--track)
start_serve "$T/disk.raw"
fio "${FIO_COMMON[@]}" --thread --uri="$MAIN" --do_verify=0 --rate_iops=300 \
	--output="$T/fio.out" >/dev/null 2>&1 &
FIO=$!

# --- forever incremental: one raw export ------------------------------
export_start export qemu-nbd -f raw -t -k "$T/export.sock" "$T/export.raw"
RAW_PID=$EXPORT_PID
at_instant "$T/at1.raw" "$T/b1.out" --to "$(export_uri export)" --catalog "$CAT"
((BACKUP_RC == 0)) || { cat "$T/b1.out.err" >&2; fail "full point into the export"; }
run_ok cmp -- "$T/export.raw" "$T/at1.raw"
[[ $(events_in "$T/b1.out") == "BACKUP_STARTED SNAPSHOT_TAKEN CHECKPOINT_CREATED BACKUP_PROGRESS DATA_FLUSHED DIGESTS_WRITTEN POINT_COMMITTED BACKUP_COMPLETED" ]] ||
	fail "the events of a full point over the control socket: $(events_in "$T/b1.out")"
tail -n 1 "$T/b1.out" >"$T/b1.json"
json_assert "$T/b1.json" "d['point'] == 1" "d['file'] == '$(export_uri export)'"
pass "a full point into an NBD export equals its instant; every step an event"

for n in 2 3; do
	at_instant "$T/at$n.raw" "$T/b$n.out" --to "$(export_uri export)" \
		--catalog "$CAT" --incremental
	((BACKUP_RC == 0)) || { cat "$T/b$n.out.err" >&2; fail "incremental point $n into the export"; }
	run_ok cmp -- "$T/export.raw" "$T/at$n.raw"
	tail -n 1 "$T/b$n.out" >"$T/b$n.json"
	json_assert "$T/b$n.json" "d['point'] == $n" "d['incremental'] is True" \
		"d['healed'] is False" "d['bytes_read'] == d['bytes_changed']" \
		"65536 <= d['bytes_changed'] < $SIZE"
	[[ $(events_in "$T/b$n.out") == "BACKUP_STARTED SNAPSHOT_TAKEN CHECKPOINT_CREATED BACKUP_PROGRESS DATA_FLUSHED DIGESTS_WRITTEN POINT_COMMITTED CHECKPOINT_REMOVED BACKUP_COMPLETED" ]] ||
		fail "the events of incremental point $n: $(events_in "$T/b$n.out")"
done
python3 - "$CAT/0003.json" "$(export_uri export)" <<'EOF' || fail "the manifest of point 3"
import json, sys
m = json.load(open(sys.argv[1]))
assert m['target'] == sys.argv[2] and m['incremental'] and not m.get('backing'), m
EOF
pass "incremental points write only the changed granules; the export equals each instant"

# --- a chain on the remote side: one qcow2 overlay per point -----------
run_ok qemu-img create -q -f qcow2 "$T/ov1.qcow2" "$SIZE"
kind=()
for n in 1 2 3; do
	if ((n > 1)); then
		run_ok qemu-img create -q -f qcow2 -b "ov$((n - 1)).qcow2" -F qcow2 \
			"$T/ov$n.qcow2" "$SIZE"
		kind=(--incremental)
	fi
	export_start ov qemu-nbd -f qcow2 -t -k "$T/ov.sock" "$T/ov$n.qcow2"
	at_instant "$T/ov-at$n.raw" "$T/ov$n.out" --to "$(export_uri ov)" \
		--catalog "$CHAIN" "${kind[@]}"
	((BACKUP_RC == 0)) || { cat "$T/ov$n.out.err" >&2; fail "point $n into overlay $n"; }
	export_stop
done
for n in 1 2 3; do
	run_ok qemu-img compare -q -f qcow2 -F raw "$T/ov$n.qcow2" "$T/ov-at$n.raw"
done
run_ok qemu-img check -q "$T/ov3.qcow2"
pass "per-point qcow2 overlays: a remote chain, every overlay equals its instant"

# --- the catalogue: list, verify, restore ------------------------------
run_ok "$BMIRROR" backup list --catalog "$CAT" --json
json_assert "$RUN_OUT" "[p['superseded'] for p in d['points']] == [True, True, False]" \
	"all(p['file'] == '$(export_uri export)' for p in d['points'])"
run_ok "$BMIRROR" backup verify --catalog "$CAT" --json
[[ $(events_in "$RUN_OUT") == "POINT_SUPERSEDED POINT_SUPERSEDED POINT_VERIFIED" ]] ||
	fail "the events of verify: $(events_in "$RUN_OUT")"
tail -n 1 "$RUN_OUT" >"$T/v.json"
json_assert "$T/v.json" "d['ok'] is True" "d['points'] == 1" "d['bytes_read'] == $SIZE"
run_ok "$BMIRROR" backup restore --catalog "$CAT" --to "$T/r3.raw"
run_ok cmp -- "$T/r3.raw" "$T/at3.raw"
expect_fail_with --names "$CAT" nonzero 'point 0002 is superseded' \
	"$BMIRROR" backup restore --catalog "$CAT" --point 2 --to "$T/r2.raw"
[[ ! -e $T/r2.raw ]] || fail "a refused restore left an image"
expect_fail_with --names "$(export_uri export)" nonzero 'in the NBD export .*not in a file' \
	"$BMIRROR" backup restore --catalog "$CAT" --overlay "$T/ov.qcow2"
[[ ! -e $T/ov.qcow2 ]] || fail "a refused overlay was made"
# Damage in the export: verify names the point and the offset.
cp -- "$T/export.raw" "$T/export.good"
flip_byte "$T/export.raw" $((5 * MiB + 7))
expect_fail_with nonzero 'point 0003 is damaged.* at 5242880' \
	"$BMIRROR" backup verify --catalog "$CAT"
cp -- "$T/export.good" "$T/export.raw"
run_ok "$BMIRROR" backup verify --catalog "$CAT"
pass "the catalogue: superseded points listed, the newest verified and restored, damage named"

# fio writes every block once: let it finish and verify them all.  What
# follows writes over its blocks.
wait "$FIO" || { cat "$T/fio.out" >&2; fail "fio failed while the backups ran"; }
fio_verify "after the backups"
pass "fio, writing all along, verifies every write it made"

# point_now N: the disk copied (nobody writes now), then point N into
# the raw export.
point_now() {
	run_ok qemu-img convert -f raw -O raw "$MAIN" "$T/at$1.raw"
	run_ok "$BMIRROR" backup --control "$CTL" --to "$(export_uri export)" \
		--catalog "$CAT" --incremental --json
	tail -n 1 "$RUN_OUT" >"$T/b$1.json"
	json_assert "$T/b$1.json" "d['point'] == $1" "d['healed'] is False"
	run_ok cmp -- "$T/export.raw" "$T/at$1.raw"
}

# --- a target that fills up -------------------------------------------
run_ok qemu-io -f raw -c "write -P 0x3c 4M 8M" "$MAIN"
export_start full nbdkit -f --exit-with-parent -U "$T/full.sock" full "size=$SIZE"
# An incremental point writes only what changed: into an export that
# does not hold point 3 (this one reads as zeroes) it is refused before
# a byte is written.  A full point runs into the full disk.
expect_fail_with --names "$(export_uri full)" nonzero 'does not hold point 0003' \
	"$BMIRROR" backup --control "$CTL" --to "$(export_uri full)" --catalog "$CAT" --incremental
expect_fail_with --names "$(export_uri full)" nonzero 'no space left on device' \
	"$BMIRROR" backup --control "$CTL" --to "$(export_uri full)" --catalog "$CAT"
export_stop
[[ $(points_in "$CAT") == "0001.json 0002.json 0003.json " ]] ||
	fail "a full target left a point: $(points_in "$CAT")"
[[ ! -e $CAT/0004.digests ]] || fail "a full target left digests"

# The same export filling up half way through the point: some of the
# new point's granules are in it (32 writes, two whole chunks of 16
# granules at most: progress said), the rest fail.
target_start efile "$T/export.raw" 32 enospc
EFILE_PID=$EXPORT_PID
run "$BMIRROR" backup --control "$CTL" --to "$(export_uri efile)" --catalog "$CAT" \
	--incremental --json
cp -- "$RUN_OUT" "$T/efull.out"
cp -- "$RUN_ERR" "$T/efull.err"
((RUN_RC == 1)) || { cat "$T/efull.err" >&2; fail "a target that fills up half way: exit $RUN_RC"; }
[[ -e $T/efile.held ]] || fail "the target that fills up never filled up"
grep -Fq "$(export_uri efile)" "$T/efull.err" && grep -qi 'no space' "$T/efull.err" ||
	fail "the error does not name the target and the problem: $(cat "$T/efull.err")"
[[ $(events_in "$T/efull.out") == "BACKUP_STARTED SNAPSHOT_TAKEN CHECKPOINT_CREATED BACKUP_PROGRESS BACKUP_FAILED" ]] ||
	fail "the events of a failed point: $(events_in "$T/efull.out")"
python3 - "$T/efull.out" <<'EOF' || fail "BACKUP_FAILED without errno 28 and a message"
import json, sys
e = [json.loads(l) for l in open(sys.argv[1]) if '"BACKUP_FAILED"' in l][0]
assert e['errno'] == 28 and 'efile.sock' in e['error'], e
EOF
EXPORT_PID=$EFILE_PID
export_stop
cmp -s -- "$T/export.raw" "$T/at3.raw" && fail "the half-written point wrote nothing: no test"
[[ $(points_in "$CAT") == "0001.json 0002.json 0003.json " ]] ||
	fail "a target full half way left a point: $(points_in "$CAT")"
# The export no longer holds point 3 alone: verify and restore say why.
expect_fail_with --names "$(export_uri efile)" nonzero \
	'point 0003: its export .* was partly overwritten by a backup that failed \(point 0004, into ' \
	"$BMIRROR" backup verify --catalog "$CAT"
expect_fail_with nonzero 'partly overwritten' \
	"$BMIRROR" backup restore --catalog "$CAT" --to "$T/r.raw"
run_ok "$BMIRROR" backup list --catalog "$CAT" --json
python3 - "$RUN_OUT" <<'EOF' || fail "list does not say point 3's export was overwritten"
import json, sys
pts = json.load(open(sys.argv[1]))
pts = pts['points'] if isinstance(pts, dict) else pts
assert [p['superseded'] for p in pts] == [True, True, True], pts
EOF

# The next point, into the raw export again, covers everything since
# point 3 (the failed attempts' checkpoints were removed), and so puts
# right what the half-written one left in the export.
point_now 4
json_assert "$T/b4.json" "d['bytes_changed'] >= 8 * 2**20"
pass "a full target: clear error naming it, no point, the next point whole; an incremental into an export without the previous point is refused"

# --- a target that dies half way ---------------------------------------
# It takes 32 writes and holds the next: killed then, on any machine.
run_ok qemu-io -f raw -c "write -P 0x4d 12M 8M" "$MAIN"
target_start slow "$T/export.raw" 32 hold
SLOW_PID=$EXPORT_PID
"$BMIRROR" backup --control "$CTL" --to "$(export_uri slow)" --catalog "$CAT" \
	--incremental --json >"$T/dead.out" 2>"$T/dead.err" &
b=$!
wait_for_file "$T/slow.held" "$b" ||
	{ cat "$T/dead.err" >&2; fail "the backup never came to the target's 33rd write"; }
kill -9 "$SLOW_PID"
wait "$SLOW_PID" 2>/dev/null || true
EXPORT_PID=
# What nbdkit would have removed on its way out (its sh plugin's).
d=$(cat "$T/slow.tmpdir")
[[ $d == */nbdkit?????? ]] && rm -rf -- "$d"
rc=0
wait "$b" || rc=$?
((rc == 1)) || { cat "$T/dead.err" >&2; fail "a killed target: exit $rc"; }
[[ $(wc -l <"$T/dead.err") == 1 ]] && grep -Fq "$(export_uri slow)" "$T/dead.err" ||
	fail "the error does not name the killed target in one line: $(cat "$T/dead.err")"
grep -q '"BACKUP_FAILED"' "$T/dead.out" || fail "no BACKUP_FAILED event"
[[ $(points_in "$CAT") == "0001.json 0002.json 0003.json 0004.json " ]] ||
	fail "a killed target left a point: $(points_in "$CAT")"
point_now 5
json_assert "$T/b5.json" "d['bytes_changed'] >= 8 * 2**20"
run_ok "$BMIRROR" backup verify --catalog "$CAT"
pass "a killed target: clear error naming it, no point, the next point whole"

# A full point into an export that holds an older point: where the disk
# now reads zeroes (written as zeroes, or discarded), so must the export.
run_ok qemu-io -f raw -c "write -z 0 4M" -c "discard 8M 2M" "$MAIN"
run_ok qemu-img convert -f raw -O raw "$MAIN" "$T/at6.raw"
run_ok "$BMIRROR" backup --control "$CTL" --to "$(export_uri export)" --catalog "$CAT" --json
tail -n 1 "$RUN_OUT" >"$T/b6.json"
json_assert "$T/b6.json" "d['point'] == 6" "d['incremental'] is False"
run_ok cmp -- "$T/export.raw" "$T/at6.raw"
run_ok "$BMIRROR" backup verify --catalog "$CAT"
pass "a full point over an older one: the export reads zeroes where the disk does"

# The guest's disk went on serving through it all.
run_ok qemu-io -f raw -c "write -P 0x5e 0 64k" -c "read -P 0x5e 0 64k" \
	-c "read -P 0x4d 12M 8M" "$MAIN"
EXPORT_PID=$RAW_PID
export_stop
stop_serve
pass "the served disk is unaffected by failing targets"

# --- healing into an export that a failed point wrote into -------------
# An image that no program runs has no change record: its incremental
# points heal by digests, trusting the export to hold the previous point.
# A point that failed half way broke that trust, and its mark makes the
# next point write every granule.
IMG=$T/img.raw
head -c $((8 * MiB)) /dev/urandom >"$IMG"
cp -- "$IMG" "$T/img.p1"
truncate -s $((8 * MiB)) "$T/hexp.raw"
export_start hexp qemu-nbd -f raw -t -k "$T/hexp.sock" "$T/hexp.raw"
HEXP=$EXPORT_PID
run_ok "$BMIRROR" backup "$IMG" --to "$(export_uri hexp)" --catalog "$T/hcat"
run_ok cmp -- "$T/hexp.raw" "$IMG"
# Point 2 writes its new data at 1 MiB, then fails to zero 5 MiB.
run_ok qemu-io -f raw -c "write -P 0x77 1M 64k" -c "write -z 5M 64k" "$IMG"
export_start hfail nbdkit -f --exit-with-parent -U "$T/hfail.sock" --filter=error \
	file "$T/hexp.raw" error-zero=ENOSPC error-zero-rate=100%
expect_fail_with --names "$(export_uri hfail)" nonzero 'no space left on device' \
	"$BMIRROR" backup "$IMG" --to "$(export_uri hfail)" --catalog "$T/hcat" --incremental
export_stop
cmp -s -- "$T/hexp.raw" "$T/img.p1" && fail "the failed point wrote nothing: no test"
# Back to point 1's content: by the digests nothing changed since.
cp -- "$T/img.p1" "$IMG"
run_ok "$BMIRROR" backup "$IMG" --to "$(export_uri hexp)" --catalog "$T/hcat" \
	--incremental --json
tail -n 1 "$RUN_OUT" >"$T/h2.json"
json_assert "$T/h2.json" "d['point'] == 2" "d['healed'] is True" \
	"d['bytes_written'] == 8 * 2**20"
run_ok cmp -- "$T/hexp.raw" "$IMG"
run_ok "$BMIRROR" backup verify --catalog "$T/hcat"
EXPORT_PID=$HEXP
export_stop
pass "healing after a failed point into the export writes every granule"
