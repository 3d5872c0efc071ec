#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Checkpoints of a qcow2 disk kept in the image as persistent dirty
# bitmaps (docs/cbt.md), checked with QEMU's own tools:
#   - `bmirror serve --track` on a qcow2 image records in the image (no
#     sidecar); after checkpoints and NBD writes, `qemu-img info` lists
#     the bitmaps by name and granularity, auto only on the newest, and
#     `qemu-img check` is clean;
#   - qemu-nbd -B exports them: the dirty extents are exactly the
#     granules written; `qemu-img bitmap` --add/--merge/--disable/--remove
#     work on the image;
#   - qemu-io writes with the image's auto bitmap loaded are seen by the
#     next `bmirror backup --incremental` (its point equals the image);
#   - kill -9 of serve while qemu-io writes: restarted, the checkpoint is
#     trusted and covers every acknowledged write, whose data is there;
#   - a bitmap left in use (qemu-nbd killed with the image open) and an
#     image written without the tracker (autoclear bit 0 cleared) are
#     reported untrusted, and the next backup heals;
#   - after a move the source's bitmaps still take marks, and creating a
#     checkpoint is refused, saying why;
#   - a damaged bitmap directory is refused at open, naming the entry; a
#     bitmap naming an L2 table is refused when tracking starts;
#   - --track=FILE, and qcow2 clusters under 4 KiB, still keep a sidecar;
#   - a base moved (to a shorter, then a longer name) before the first
#     checkpoint: the overlay names the new base, whole, beside its
#     bitmaps; qemu-img check is clean and the data reads through it.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io qemu-nbd nbdinfo python3 timeout

SIZE=$((64 * MiB))
IMG=$T/disk.qcow2
MAIN="nbd+unix:///?socket=$T/nbd.sock"
CTL=$T/ctl.sock
DIR=$T/backups
G=65536

# info_assert CHECK...: qemu-img info --output=json of the image, with
# b = its list of bitmaps ([] if none).
info_assert() {
	qemu-img info --output=json "$IMG" |
		python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"b": d.get("format-specific", {}).get("data", {}).get("bitmaps", [])}))' \
			>"$T/info.json" || fail "qemu-img info failed"
	local c args=()
	for c in "$@"; do args+=("(lambda b: $c)(d['b'])"); done
	json_assert "$T/info.json" "${args[@]}"
}

# dirty_map NAME: the dirty extents of bitmap NAME as QEMU exports them
# (qemu-nbd -B), "offset length" per line.
dirty_map() {
	rm -f "$T/q.sock" "$T/q.pid"
	run_ok qemu-nbd --fork --pid-file="$T/q.pid" -r -f qcow2 -B "$1" \
		-k "$T/q.sock" "$IMG"
	run nbdinfo --map="qemu:dirty-bitmap:$1" "nbd+unix:///?socket=$T/q.sock"
	kill "$(cat "$T/q.pid")" 2>/dev/null || true
	while kill -0 "$(cat "$T/q.pid")" 2>/dev/null; do sleep 0.05; done
	((RUN_RC == 0)) || { cat "$RUN_ERR" >&2; fail "nbdinfo --map of $1"; }
	awk '$3 == 1 {print $1, $2}' "$RUN_OUT"
}

# backup_json N: the result line of backup point N's output.
backup_json() {
	tail -n 1 "$T/b$1.out" >"$T/b$1.json"
	echo "$T/b$1.json"
}

# heal N REASON: every checkpoint is untrusted for REASON; incremental
# backup point N heals, and its new checkpoint is trusted.
heal() {
	run_ok "$BMIRROR" checkpoint --control "$CTL" --list --json
	json_assert "$RUN_OUT" "not any(c['trusted'] for c in d['checkpoints'])" \
		"all('$2' in c['reason'] for c in d['checkpoints'])"
	"$BMIRROR" backup --control "$CTL" --to "$DIR" --incremental --json \
		>"$T/b$1.out" 2>"$T/b$1.err" || { cat "$T/b$1.err" >&2; fail "healing backup"; }
	json_assert "$(backup_json "$1")" "d['healed'] is True"
	run_ok "$BMIRROR" checkpoint --control "$CTL" --list --json
	json_assert "$RUN_OUT" "d['checkpoints'][-1]['trusted'] is True"
}

qemu-img create -q -f qcow2 "$IMG" "$SIZE"

# ---- serve --track records in the image --------------------------------------
SERVE_EXTRA=(--track)
start_serve "$IMG"
run_ok "$BMIRROR" status --control "$CTL" --json
json_assert "$RUN_OUT" "d['tracking']['record'] == 'image'" \
	"d['tracking']['path'].endswith('disk.qcow2')" \
	"'sidecar' not in d['tracking']" "d['tracking']['crashed'] is False"
[[ ! -e $IMG.bmirror-cbt ]] || fail "a sidecar was made for a qcow2 image"
run_ok "$BMIRROR" checkpoint --control "$CTL" --create c1
grep -q "^# record: image .*disk.qcow2$" "$RUN_OUT" || { cat "$RUN_OUT" >&2; fail "checkpoint list does not say where"; }
# Granules 0, 64..67 (4M + 100 + 200k), then 128 (8M) after c2.
run_ok qemu-io -f raw -c "write -P 0x11 0 64k" -c "write -P 0x22 4194404 200k" "$MAIN"
run_ok "$BMIRROR" checkpoint --control "$CTL" --create c2
run_ok qemu-io -f raw -c "write -P 0x33 8M 4k" "$MAIN"
run_ok "$BMIRROR" checkpoint --control "$CTL" --list --json
json_assert "$RUN_OUT" "[c['name'] for c in d['checkpoints']] == ['c1', 'c2']" \
	"d['checkpoints'][0]['changed_bytes'] == 5 * $G" \
	"d['checkpoints'][1]['changed_bytes'] == $G" \
	"all(c['trusted'] for c in d['checkpoints'])" \
	"d['tracking']['record'] == 'image'"
stop_serve
pass "serve --track keeps the checkpoints in the image, status and list say so"

info_assert "[x['name'] for x in b] == ['c1', 'c2']" \
	"all(x['granularity'] == $G for x in b)" \
	"b[0]['flags'] == [] and b[1]['flags'] == ['auto']"
run_ok qemu-img check -q "$IMG"
pass "qemu-img info lists c1 (frozen) and c2 (auto), 64 KiB; check is clean"

dirty_map c1 >"$T/map"
printf '0 65536\n4194304 262144\n' | cmp -s - "$T/map" || { cat "$T/map" >&2; fail "QEMU's c1 is not the granules written"; }
dirty_map c2 >"$T/map"
printf '8388608 65536\n' | cmp -s - "$T/map" || { cat "$T/map" >&2; fail "QEMU's c2 is not the granules written"; }
pass "qemu-nbd -B exports exactly the written granules"

run_ok qemu-img bitmap --add "$IMG" q1
run_ok qemu-img bitmap --merge c1 "$IMG" q1
run_ok qemu-img bitmap --disable "$IMG" q1
info_assert "[x['name'] for x in b] == ['c1', 'c2', 'q1']" "b[2]['flags'] == []"
dirty_map q1 >"$T/map"
printf '0 65536\n4194304 262144\n' | cmp -s - "$T/map" || fail "q1 is not c1 merged"
run_ok qemu-img bitmap --remove "$IMG" q1
info_assert "[x['name'] for x in b] == ['c1', 'c2']" "b[1]['flags'] == ['auto']"
run_ok qemu-img check -q "$IMG"
pass "qemu-img bitmap --add, --merge, --disable and --remove work on it"

# ---- QEMU's writes reach the next incremental backup ------------------------
start_serve "$IMG"
run_ok "$BMIRROR" backup --control "$CTL" --to "$DIR" --json
stop_serve
info_assert "b[-1]['flags'] == ['auto']" "len(b) == 3"
# QEMU opens the image, marks the auto bitmap (the backup's checkpoint).
run_ok qemu-io -f qcow2 -c "write -P 0x55 20M 64k" -c "write -P 0x56 30M 4k" "$IMG"
start_serve "$IMG"
"$BMIRROR" backup --control "$CTL" --to "$DIR" --incremental --json \
	>"$T/b2.out" 2>"$T/b2.err" || { cat "$T/b2.err" >&2; fail "incremental backup"; }
stop_serve
json_assert "$(backup_json 2)" "d['incremental'] is True" "d['healed'] is False" \
	"d['bytes_changed'] == 2 * $G"
run_ok qemu-img compare -q -f qcow2 -F qcow2 "$DIR/0002.qcow2" "$IMG"
pass "writes QEMU made into the auto bitmap are in the next incremental point"

# ---- kill -9 of serve during writes -----------------------------------------
# Allocate the region first, so that acknowledged data is in the file.
run_ok qemu-io -f qcow2 -c "write -P 0 40M 1M" "$IMG"
start_serve "$IMG"
run_ok "$BMIRROR" checkpoint --control "$CTL" --create k1
kill_serve_during_writes $((40 * MiB)) "$T/qio.out"
acked=$(grep -c '^wrote 4096/4096' "$T/qio.out" || true)
((acked > 0)) || fail "no write was acknowledged before the kill"
run_ok qemu-img check "$IMG"
start_serve "$IMG"
run_ok "$BMIRROR" checkpoint --control "$CTL" --list --json
json_assert "$RUN_OUT" "d['checkpoints'][-1]['name'] == 'k1'" \
	"all(c['trusted'] for c in d['checkpoints'])" "d['tracking']['crashed'] is False"
stop_serve
dirty_map k1 >"$T/map"
python3 - "$T/qio.out" "$T/map" "$IMG" <<'PY' || fail "an acknowledged write is missing after kill -9"
import re, subprocess, sys
dirty = [tuple(int(x) for x in l.split()) for l in open(sys.argv[2])]
for l in open(sys.argv[1]):
    m = re.match(r'wrote 4096/4096 bytes at offset (\d+)', l)
    if not m:
        continue
    off = int(m.group(1))
    if not any(a <= off < a + n for a, n in dirty):
        sys.exit(f"acknowledged write at {off} is not in k1")
    r = subprocess.run(['qemu-io', '-f', 'qcow2', '-c',
                        f'read -P 0x44 {off} 4k', sys.argv[3]],
                       capture_output=True, text=True)
    if r.returncode or 'Pattern verification failed' in r.stdout:
        sys.exit(f"acknowledged write at {off} did not reach the image")
PY
pass "after kill -9: k1 trusted, holds all $acked acknowledged writes, data there"

# ---- untrusted: in use, autoclear cleared -----------------------------------
# qemu-nbd opens it read-write (every bitmap in use) and is killed.
rm -f "$T/q.sock" "$T/q.pid"
run_ok qemu-nbd --fork --persistent --pid-file="$T/q.pid" -f qcow2 \
	-k "$T/q.sock" "$IMG"
run_ok qemu-io -f raw -c "write -P 0x66 50M 64k" "nbd+unix:///?socket=$T/q.sock"
kill -9 "$(cat "$T/q.pid")"
while kill -0 "$(cat "$T/q.pid")" 2>/dev/null; do sleep 0.05; done
info_assert "all('in-use' in x['flags'] for x in b)"
start_serve "$IMG"
heal 3 'in use'
stop_serve
run_ok qemu-img compare -q -f qcow2 -F qcow2 "$DIR/0003.qcow2" "$IMG"
info_assert "b[-1]['flags'] == ['auto']"
run_ok qemu-img check -q "$IMG"
pass "bitmaps left in use by QEMU are untrusted; the next backup heals"

# serve without --track writes: our driver clears autoclear bit 0.
SERVE_EXTRA=()
start_serve "$IMG"
run_ok qemu-io -f raw -c "write -P 0x77 60M 4k" "$MAIN"
stop_serve
SERVE_EXTRA=(--track)
start_serve "$IMG"
heal 4 'does not keep'
stop_serve
run_ok qemu-img compare -q -f qcow2 -F qcow2 "$DIR/0004.qcow2" "$IMG"
run_ok qemu-img check -q "$IMG"
pass "an image written without the tracker: untrusted, the next backup heals"

# ---- after a move -----------------------------------------------------------
# The record stays in the source's bitmaps: marks go on there, the list
# can no longer change (docs/cbt.md).
start_serve "$IMG"
run_ok "$BMIRROR" checkpoint --control "$CTL" --create m1
run_ok "$BMIRROR" move --control "$CTL" --to "$T/moved.raw" -O raw
run_ok qemu-io -f raw -c "write -P 0x78 62M 4k" "$MAIN"
expect_fail_with --names "$IMG" 1 "moved off it" \
	"$BMIRROR" checkpoint --control "$CTL" --create m2
# Backups go on, without checkpoints (each point heals), rather than fail.
run_ok "$BMIRROR" backup --control "$CTL" --to "$T/after-move" --json
tail -n 1 "$RUN_OUT" >"$T/am1.json"
json_assert "$T/am1.json" "d['point'] == 1" "not d['checkpoint']"
run_ok qemu-io -f raw -c "write -P 0x79 20M 64k" "$MAIN"
run_ok qemu-img convert -f raw -O raw "$MAIN" "$T/am2.raw"
run_ok "$BMIRROR" backup --control "$CTL" --to "$T/after-move" --incremental --json
tail -n 1 "$RUN_OUT" >"$T/am2.json"
json_assert "$T/am2.json" "d['point'] == 2" "d['incremental'] is True" \
	"d['healed'] is True" "d['bytes_changed'] >= 65536"
run_ok qemu-img compare -q -f qcow2 -F raw "$T/after-move/0002.qcow2" "$T/am2.raw"
stop_serve
info_assert "b[-1]['name'] == 'm1'" "b[-1]['flags'] == ['auto']"
run_ok qemu-img check -q "$IMG"
dirty_map m1 >"$T/map"
printf '20971520 65536\n65011712 65536\n' | cmp -s - "$T/map" || { cat "$T/map" >&2; fail "the writes after the move are not in m1"; }
pass "after a move: marks go on into the source's bitmaps, the list is fixed, backups heal"

# ---- a damaged directory -----------------------------------------------------
# Its first entry's table size (offset 8 in the entry) made wrong: every
# open refuses the image, naming it and the entry.
cp -- "$IMG" "$T/bad.qcow2"
python3 - "$T/bad.qcow2" <<'PY'
import struct, sys
f = open(sys.argv[1], 'r+b')
h = f.read(65536)
pos = struct.unpack('>I', h[100:104])[0]
while True:
    t, n = struct.unpack('>II', h[pos:pos + 8])
    if t == 0x23852875:
        break
    assert t, "no bitmaps extension"
    pos += 8 + (n + 7) // 8 * 8
d = struct.unpack('>Q', h[pos + 24:pos + 32])[0]
f.seek(d + 8)
f.write(struct.pack('>I', 7))
PY
expect_fail_with --names "$T/bad.qcow2" nonzero 'bitmap directory entry 0 .*table size' \
	"$BMIRROR" info "$T/bad.qcow2"
pass "a damaged bitmap directory is refused at open, naming the entry"

# ---- a bitmap that names an L2 table -----------------------------------------
# Its first table entry made the image's first L2 table: a checkpoint
# creation would free that table and reuse it.  Tracking is refused,
# naming the bitmap and the cluster, and the guest's data is untouched.
cp -- "$IMG" "$T/hostile.qcow2"
python3 - "$T/hostile.qcow2" <<'PY'
import struct, sys
f = open(sys.argv[1], 'r+b')
h = f.read(65536)
f.seek(struct.unpack('>Q', h[40:48])[0])
l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
assert l2
pos = struct.unpack('>I', h[100:104])[0]
while True:
    t, n = struct.unpack('>II', h[pos:pos + 8])
    if t == 0x23852875:
        break
    pos += 8 + (n + 7) // 8 * 8
d = struct.unpack('>Q', h[pos + 24:pos + 32])[0]
f.seek(d)
f.seek(struct.unpack('>Q', f.read(8))[0])
f.write(struct.pack('>Q', l2))
PY
expect_fail_with --names "$T/hostile.qcow2" nonzero 'qcow2 bitmap [^ ]*: cluster 0x[0-9a-f]* is also an L2 table' \
	timeout -k 5 20 "$BMIRROR" serve --nbd "unix:$T/h.sock" --control "$T/h-ctl.sock" \
	--track "$T/hostile.qcow2"
run_ok qemu-img compare -q "$IMG" "$T/hostile.qcow2"
pass "a bitmap naming an L2 table: tracking refused, naming it; the data untouched"

# ---- --track=FILE keeps a sidecar -------------------------------------------
SERVE_EXTRA=(--track="$T/side.cbt")
start_serve "$IMG"
run_ok "$BMIRROR" status --control "$CTL" --json
json_assert "$RUN_OUT" "d['tracking']['record'] == 'sidecar'" \
	"d['tracking']['sidecar'].endswith('side.cbt')"
stop_serve
[[ -f $T/side.cbt ]] || fail "no sidecar with --track=FILE"
# Clusters smaller than a 4 KiB page of a bitmap: the sidecar.
qemu-img create -q -f qcow2 -o cluster_size=512 "$T/small.qcow2" 1M
SERVE_EXTRA=(--track)
start_serve "$T/small.qcow2"
run_ok "$BMIRROR" status --control "$CTL" --json
json_assert "$RUN_OUT" "d['tracking']['record'] == 'sidecar'"
stop_serve
[[ -f $T/small.qcow2.bmirror-cbt ]] || fail "no sidecar for 512-byte clusters"
pass "--track=FILE, and a qcow2 image with 512-byte clusters, keep a sidecar"

# ---- a base moved before the first checkpoint -------------------------------
# The move re-points the overlay (set_backing) at a shorter, then at a
# longer name; the first checkpoint then adds the bitmaps extension and
# must not write over the name, nor move it with the old one's length.
OLDBASE=$T/the-original-base-of-the-overlay.qcow2
TOP=$T/top.qcow2
SERVE_EXTRA=(--track)
for newbase in "$T/b.qcow2" "$T/a-much-longer-name-for-the-new-base-of-the-overlay-disk.qcow2"; do
	rm -f "$TOP" "$OLDBASE" "$newbase"
	run_ok qemu-img create -q -f qcow2 "$OLDBASE" "$SIZE"
	run_ok qemu-io -f qcow2 -c "write -P 0x21 0 1M" -c "write -P 0x22 8M 1M" "$OLDBASE"
	run_ok qemu-img create -q -f qcow2 -b "$OLDBASE" -F qcow2 "$TOP"
	run_ok qemu-io -f qcow2 -c "write -P 0x31 9M 64k" "$TOP"
	run_ok qemu-img convert -O raw "$TOP" "$T/expected.raw"
	start_serve "$TOP"
	run_ok "$BMIRROR" move --control "$CTL" --base --to "$newbase" --json
	grep -q '"event":"COMPLETED"' "$RUN_OUT" || fail "base move to $newbase: no COMPLETED event"
	run_ok "$BMIRROR" checkpoint --control "$CTL" --create c1
	run_ok qemu-io -f raw -c "write -P 0x41 16M 64k" "$MAIN"
	run_ok "$BMIRROR" checkpoint --control "$CTL" --create c2
	stop_serve
	run_ok qemu-io -f raw -c "write -P 0x41 16M 64k" "$T/expected.raw"
	qemu-img info --output=json "$TOP" |
		python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' \
			>"$T/top-info.json" || fail "qemu-img info of the overlay"
	json_assert "$T/top-info.json" "d['backing-filename'] == '$newbase'" \
		"[b['name'] for b in d['format-specific']['data']['bitmaps']] == ['c1', 'c2']"
	run_ok qemu-img check -q "$TOP"
	rm -f "$OLDBASE"
	run_ok qemu-img compare -q "$T/expected.raw" "$TOP"
done
pass "a base moved before the first checkpoint: the overlay names the new base, whole, beside its bitmaps"
