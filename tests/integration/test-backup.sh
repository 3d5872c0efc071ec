#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Integration test for `bmirror backup` of an image (docs/backup.md):
#   - a full point, then incremental ones (healed by digests: the image
#     has no change record) restore with qemu-img to exactly the image at
#     each point, and pass qemu-img check;
#   - an incremental point writes only the granules that changed;
#   - list, verify (and --against the image), prune --keep, restore;
#   - --json: every step an event line, in order, then the result;
#   - instant restore: an overlay of a point is served at once, written,
#     and moved to production storage with a pivot, the point untouched;
#   - damage in a point, a missing middle point, bad arguments: clear
#     errors, exit status not 0.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io python3 truncate head dd cmp

IMG=$T/disk.raw
DIR=$T/backups
make_mixed_image "$IMG"
SIZE=$MIXED_SIZE

# --- a full point, then incremental ones -------------------------------
run_ok "$BMIRROR" backup "$IMG" --to "$DIR" --json
tail -n 1 -- "$RUN_OUT" >"$T/p1.json"   # the result, after the events
json_assert "$T/p1.json" "d['point'] == 1" "d['incremental'] is False" \
	"d['bytes_read'] < $SIZE"
cp -- "$IMG" "$T/at1.raw"
[[ $(events_in "$RUN_OUT") == "BACKUP_STARTED SNAPSHOT_TAKEN BACKUP_PROGRESS DATA_FLUSHED DIGESTS_WRITTEN POINT_COMMITTED BACKUP_COMPLETED" ]] ||
	fail "the events of a full point: $(events_in "$RUN_OUT")"
run_ok qemu-img check -q "$DIR/0001.qcow2"
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0001.qcow2" "$T/at1.raw"
pass "full point equals the image"

# Two granules of new data and one zeroed: only those are written.
run_ok qemu-io -f raw -c "write -P 0x5a 5M 128K" -c "write -z 1M 64K" "$IMG"
run_ok "$BMIRROR" backup "$IMG" --to "$DIR" --incremental --json
tail -n 1 -- "$RUN_OUT" >"$T/p2.json"   # the result, after the events
json_assert "$T/p2.json" "d['point'] == 2" "d['incremental'] is True" \
	"d['healed'] is True" "d['bytes_written'] == 128 * 1024" \
	"d['bytes_changed'] == 192 * 1024"
cp -- "$IMG" "$T/at2.raw"
run_ok qemu-img check -q "$DIR/0002.qcow2"
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0002.qcow2" "$T/at2.raw"
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0001.qcow2" "$T/at1.raw"
pass "incremental point: only the changed granules, restores with qemu-img"

# Freeze and thaw hooks: application-consistent when the freeze holds.
run_ok qemu-io -f raw -c "write -P 0x33 9M 64K" "$IMG"
run_ok "$BMIRROR" backup "$IMG" --to "$DIR" --incremental --json \
	--freeze-cmd "echo frozen > $T/hook" --thaw-cmd "echo thawed >> $T/hook"
tail -n 1 -- "$RUN_OUT" >"$T/p3.json"   # the result, after the events
json_assert "$T/p3.json" "d['consistency'] == 'application'"
[[ $(cat "$T/hook") == $'frozen\nthawed' ]] || fail "hooks ran as: $(cat "$T/hook")"
[[ $(events_in "$RUN_OUT") == "BACKUP_STARTED FREEZE_BEGUN FROZEN SNAPSHOT_TAKEN THAWED BACKUP_PROGRESS DATA_FLUSHED DIGESTS_WRITTEN POINT_COMMITTED BACKUP_COMPLETED" ]] ||
	fail "the events of a frozen point: $(events_in "$RUN_OUT")"
cp -- "$IMG" "$T/at3.raw"
python3 -c 'import json,sys; assert json.load(open(sys.argv[1]))["consistency"] == "application"' "$DIR/0003.json" ||
	fail "the manifest of point 3 does not say application"
pass "freeze and thaw around the instant: application-consistent"

# A freeze that hangs is killed after --freeze-timeout, one that fails is
# reported; either way the point is taken, crash-consistent, and thawed.
mkdir -p "$T/hooked"
rm -f -- "$T/hook"
SECONDS=0
run_ok "$BMIRROR" backup "$IMG" --to "$T/hooked" --json --freeze-timeout 1 \
	--freeze-cmd "sleep 60" --thaw-cmd "echo thawed > $T/hook"
((SECONDS < 20)) || fail "a hung freeze held the backup ${SECONDS}s"
tail -n 1 -- "$RUN_OUT" >"$T/h1.json"   # the result, after the events
json_assert "$T/h1.json" "d['consistency'] == 'crash'"
grep -q 'freeze command did not finish in 1 s' "$RUN_ERR" || fail "no word of the freeze timeout"
[[ $(cat "$T/hook") == thawed ]] || fail "the thaw did not run after a timed-out freeze"
run_ok "$BMIRROR" backup "$IMG" --to "$T/hooked" --incremental --json \
	--freeze-cmd "exit 3"
tail -n 1 -- "$RUN_OUT" >"$T/h2.json"   # the result, after the events
json_assert "$T/h2.json" "d['consistency'] == 'crash'"
[[ $(events_in "$RUN_OUT") == "BACKUP_STARTED FREEZE_BEGUN FREEZE_FAILED SNAPSHOT_TAKEN THAWED BACKUP_PROGRESS DATA_FLUSHED DIGESTS_WRITTEN POINT_COMMITTED BACKUP_COMPLETED" ]] ||
	fail "the events of a point whose freeze failed: $(events_in "$RUN_OUT")"
grep -q 'freeze command failed (exit status 3)' "$RUN_ERR" || fail "no word of the failed freeze"
expect_fail_with 2 'freeze-timeout' "$BMIRROR" backup "$IMG" --to "$T/hooked" --freeze-timeout 0
pass "a hung or failing freeze: crash-consistent point, thawed, said"

# --- list, verify ------------------------------------------------------
run_ok "$BMIRROR" backup list "$DIR" --json
cp -- "$RUN_OUT" "$T/list.json"
json_assert "$T/list.json" "[p['point'] for p in d['points']] == [1, 2, 3]" \
	"d['points'][0]['incremental'] is False"
run_ok "$BMIRROR" backup verify "$DIR" --against "$IMG" --json
tail -n 1 -- "$RUN_OUT" >"$T/v.json"   # the result, after the events
json_assert "$T/v.json" "d['ok'] is True" "d['points'] == 3"
[[ $(events_in "$RUN_OUT") == "POINT_VERIFIED POINT_VERIFIED POINT_VERIFIED LIVE_VERIFIED" ]] ||
	fail "the events of verify: $(events_in "$RUN_OUT")"
pass "list and verify"

# --- restore -----------------------------------------------------------
run_ok "$BMIRROR" backup restore "$DIR" --point 2 --to "$T/r2.raw"
run_ok cmp -- "$T/r2.raw" "$T/at2.raw"
run_ok "$BMIRROR" backup restore "$DIR" --to "$T/r3.qcow2" -O qcow2
run_ok qemu-img compare -q -f qcow2 -F raw "$T/r3.qcow2" "$T/at3.raw"
expect_fail_with --names "$DIR" nonzero 'no point 0009' \
	"$BMIRROR" backup restore "$DIR" --point 9 --to "$T/r9.raw"
pass "restore any point, to any format"

# --- instant restore: serve an overlay, move it to production -----------
run_ok "$BMIRROR" backup restore "$DIR" --point 2 --overlay "$T/overlay.qcow2"
export BLOCKMIRROR_ALLOW_BACKING_DIRS=$DIR
start_serve "$T/overlay.qcow2"
run_ok qemu-io -f raw -c "write -P 0x66 2M 64K" "nbd+unix:///?socket=$T/nbd.sock"
run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/prod.raw" -O raw
run_ok qemu-io -f raw -c "write -P 0x67 3M 4K" "nbd+unix:///?socket=$T/nbd.sock"
stop_serve
unset BLOCKMIRROR_ALLOW_BACKING_DIRS
cp -- "$T/at2.raw" "$T/want.raw"
run_ok qemu-io -f raw -c "write -P 0x66 2M 64K" -c "write -P 0x67 3M 4K" "$T/want.raw"
run_ok cmp -- "$T/prod.raw" "$T/want.raw"
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0002.qcow2" "$T/at2.raw"
pass "instant restore: the guest runs on an overlay of point 2 while it moves to production"

cp -a -- "$DIR" "$T/damaged"   # points 1 to 3, for the damage below

# --- prune -------------------------------------------------------------
run_ok "$BMIRROR" backup prune "$DIR" --keep 2 --json
tail -n 1 -- "$RUN_OUT" >"$T/prune.json"   # the result, after the events
json_assert "$T/prune.json" "d['first'] == 2" "d['removed'] == 1" \
	"d['merged'] is True"
[[ $(events_in "$RUN_OUT") == "POINT_MERGED POINT_REMOVED" ]] ||
	fail "the events of prune: $(events_in "$RUN_OUT")"
[[ ! -e $DIR/0001.qcow2 ]] || fail "prune left point 1"
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0002.qcow2" "$T/at2.raw"
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0003.qcow2" "$T/at3.raw"
run_ok "$BMIRROR" backup verify "$DIR"
pass "prune into a synthetic full point"

# --- damage ------------------------------------------------------------
# The data of point 3 (its 64 KiB at 9 MiB), not its metadata: where
# qemu-img map says the file holds it.
HOST=$(qemu-img map --output=json -f qcow2 "$T/damaged/0003.qcow2" | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["depth"] == 0 and e["data"] and e["start"] <= 9 * 2**20 < e["start"] + e["length"]:
        print(e["offset"] + 9 * 2**20 - e["start"] + 100)
        break
')
[[ -n $HOST ]] || fail "qemu-img map shows no data of point 3 at 9 MiB"
flip_byte "$T/damaged/0003.qcow2" "$HOST"
expect_fail_with nonzero 'point 0003 is damaged.* at 9437184' \
	"$BMIRROR" backup verify "$T/damaged"
expect_fail_with nonzero 'point 0003 is damaged' \
	"$BMIRROR" backup restore "$T/damaged" --to "$T/bad.raw"
[[ ! -e $T/bad.raw ]] || fail "a failed restore left its image"
mv -- "$T/damaged/0002.json" "$T/p2.json.saved"
expect_fail_with --names "$T/damaged" nonzero 'point 0002 is missing.*chain is broken' \
	"$BMIRROR" backup verify "$T/damaged"
expect_fail_with nonzero 'chain is broken' \
	"$BMIRROR" backup "$IMG" --to "$T/damaged" --incremental
mv -- "$T/p2.json.saved" "$T/damaged/0002.json"
echo '{"version": 1' > "$T/damaged/0002.json"
expect_fail_with --names "$T/damaged" nonzero 'not a backup manifest' \
	"$BMIRROR" backup verify "$T/damaged"
pass "damage and a broken chain are named"

# --- a backup target that fills up ------------------------------------
# The error names the problem, no point is left, the image is unchanged,
# and a served disk goes on serving.
if [[ $(id -u) == 0 ]] && mkdir -p -- "$T/full" &&
	mount -t tmpfs -o size=3M tmpfs "$T/full" 2>"$T/mount.err"; then
	sum=$(checksum "$IMG")
	expect_fail_with nonzero 'space' "$BMIRROR" backup "$IMG" --to "$T/full/b"
	[[ -z $(ls -- "$T/full/b") ]] || { ls -la -- "$T/full/b" >&2; fail "a full target kept files"; }
	[[ $(checksum "$IMG") == "$sum" ]] || fail "the image changed"
	start_serve "$IMG"
	expect_fail_with nonzero 'space' \
		"$BMIRROR" backup --control "$T/ctl.sock" --to "$T/full/s"
	[[ -z $(ls -- "$T/full/s") ]] || fail "a full target kept files (served)"
	run_ok qemu-io -f raw -c "write -P 0x71 0 64k" -c "read -P 0x71 0 64k" \
		"nbd+unix:///?socket=$T/nbd.sock"
	run_ok "$BMIRROR" snapshot --control "$T/ctl.sock" --list --json
	json_assert "$RUN_OUT" "d['snapshots'] == []"
	stop_serve
	umount "$T/full"
	pass "a full backup target: clear error, nothing left, the disk goes on"
elif [[ ${CI:-} == true ]]; then
	fail "the full-target case needs root and tmpfs: $(cat "$T/mount.err" 2>/dev/null)"
else
	skip_subcase "the full-target case needs root (mount -t tmpfs)"
fi

# --- bad arguments -----------------------------------------------------
expect_fail_with 2 'needs --to' "$BMIRROR" backup "$IMG"
expect_fail_with --names "nbd+unix:///?socket=$T/none.sock" 2 'an NBD target needs --catalog DIR' \
	"$BMIRROR" backup "$IMG" --to "nbd+unix:///?socket=$T/none.sock"
expect_fail_with 2 'catalog goes with an NBD URI' \
	"$BMIRROR" backup "$IMG" --to "$DIR" --catalog "$T/c"
expect_fail_with 2 'keep' "$BMIRROR" backup prune "$DIR"
expect_fail_with 2 'keep' "$BMIRROR" backup prune "$DIR" --keep 0
expect_fail_with nonzero 'no point to build' \
	"$BMIRROR" backup "$IMG" --to "$T/empty" --incremental
expect_fail_with nonzero 'holds no backup point' \
	"$BMIRROR" backup verify "$T/empty"
pass "bad arguments"
