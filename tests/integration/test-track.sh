#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Incremental backups from the command line (docs/cbt.md, docs/control.md,
# docs/nbd-server.md): `bmirror serve --track` records the guest's writes;
# `bmirror checkpoint` creates c1; qemu-io writes known blocks; `bmirror
# snapshot --since c1 --checkpoint c2` exports the instant with the
# context qemu:dirty-bitmap:c1, and nbdinfo --map of it shows exactly the
# written 64 KiB granules (the main export has no such context).  Then
# serve is killed (-9) while qemu-io writes, and started again: it says
# the tracker crashed, and the checkpoints are still trusted and still
# see the writes.  Bad input is refused naming what is wrong.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io nbdinfo python3

SIZE=$((16 * MiB))
MAIN="nbd+unix:///?socket=$T/nbd.sock"
CTL=$T/ctl.sock

head -c "$SIZE" /dev/urandom >"$T/disk.raw"
SERVE_EXTRA=(--track)
start_serve "$T/disk.raw"

run_ok "$BMIRROR" status --control "$CTL" --json
json_assert "$RUN_OUT" "d['tracking']['sidecar'].endswith('disk.raw.bmirror-cbt')" \
	"d['tracking']['crashed'] is False"
[[ -f $T/disk.raw.bmirror-cbt ]] || fail "no sidecar IMAGE.bmirror-cbt"
pass "serve --track keeps IMAGE.bmirror-cbt, status shows it"

run_ok "$BMIRROR" checkpoint --control "$CTL" --create c1 --json
json_assert "$RUN_OUT" "[c['name'] for c in d['checkpoints']] == ['c1']" \
	"d['checkpoints'][0]['trusted'] is True" \
	"isint(d['checkpoints'][0]['id']) and isint(d['checkpoints'][0]['created'])"
pass "bmirror checkpoint --create c1"

# Granules of 64 KiB: 2..5 (130k + 200k), 16 (1M), 80 (5M + 4k).
run_ok qemu-io -f raw -c "write -P 0x22 130k 200k" -c "write -P 0x11 1M 64k" \
	-c "write -P 0x33 5124k 4k" "$MAIN"
run_ok "$BMIRROR" snapshot --control "$CTL" --export bk --since c1 \
	--checkpoint c2 --json
json_assert "$RUN_OUT" "d['export'] == 'bk'" "d['since'] == 'c1'" \
	"d['checkpoint'] == 'c2'" "d['changed_bytes'] == 6 * 65536"
pass "bmirror snapshot --since c1 --checkpoint c2 reports what changed"

BK="nbd+unix:///bk?socket=$T/nbd.sock"
run_ok nbdinfo --map=qemu:dirty-bitmap:c1 "$BK"
awk '{print $1, $2, $3}' "$RUN_OUT" >"$T/map"
cat >"$T/want" <<MAP
0 131072 0
131072 262144 1
393216 655360 0
1048576 65536 1
1114112 4128768 0
5242880 65536 1
5308416 11468800 0
MAP
diff -u "$T/want" "$T/map" >&2 || fail "the dirty map is not the written granules"
pass "nbdinfo --map=qemu:dirty-bitmap:c1 shows exactly the written granules"

run_ok nbdinfo --map "$BK"
run nbdinfo --map=qemu:dirty-bitmap:c1 "$MAIN"
((RUN_RC != 0)) || fail "the disk's own export has a dirty bitmap"
run_ok nbdinfo --json "$BK"
grep -q 'qemu:dirty-bitmap:c1' "$RUN_OUT" || { cat "$RUN_OUT" >&2; fail "nbdinfo does not list the context"; }
pass "base:allocation beside it; the main export has none"

run_ok "$BMIRROR" checkpoint --control "$CTL" --list --json
json_assert "$RUN_OUT" "[c['name'] for c in d['checkpoints']] == ['c1', 'c2']" \
	"d['checkpoints'][0]['changed_bytes'] == 6 * 65536" \
	"all(c['trusted'] for c in d['checkpoints'])"
run_ok "$BMIRROR" checkpoint --control "$CTL" --list
grep -q '^c2 id=2 .* trusted$' "$RUN_OUT" || { cat "$RUN_OUT" >&2; fail "bad --list output"; }
pass "the snapshot created c2"
run_ok "$BMIRROR" snapshot --control "$CTL" --release bk

# ---- bad input -----------------------------------------------------------
expect_fail_with --names nosuch 1 'no checkpoint named' \
	"$BMIRROR" snapshot --control "$CTL" --since nosuch
expect_fail_with --names nosuch 1 'no checkpoint named' \
	"$BMIRROR" checkpoint --control "$CTL" --remove nosuch
expect_fail_with 1 'bad checkpoint name' \
	"$BMIRROR" checkpoint --control "$CTL" --create 'a b'
expect_fail_with 1 'bad checkpoint name' \
	"$BMIRROR" snapshot --control "$CTL" --checkpoint "$(printf 'x%.0s' {1..65})"
expect_fail_with --names c1 1 'exists' \
	"$BMIRROR" checkpoint --control "$CTL" --create c1
expect_fail_with 2 'one of --list' \
	"$BMIRROR" checkpoint --control "$CTL" --list --create c9
expect_fail_with 2 'since' \
	"$BMIRROR" snapshot --control "$CTL" --since ''
run_ok "$BMIRROR" status --control "$CTL" --json
json_assert "$RUN_OUT" "d['snapshots'] == []"
pass "bad checkpoints and names are refused, nothing is left behind"

# ---- kill -9 while the guest writes ----------------------------------------
kill_serve_during_writes $((8 * MiB)) "$T/qio.out"
start_serve "$T/disk.raw"
grep -q 'crashed' "$T/serve.err" || { cat "$T/serve.err" >&2; fail "serve did not say the tracker crashed"; }
run_ok "$BMIRROR" status --control "$CTL" --json
json_assert "$RUN_OUT" "d['tracking']['crashed'] is True"
run_ok "$BMIRROR" checkpoint --control "$CTL" --list --json
json_assert "$RUN_OUT" "[c['name'] for c in d['checkpoints']] == ['c1', 'c2']" \
	"all(c['trusted'] for c in d['checkpoints'])"
pass "after kill -9: crashed reported, checkpoints still trusted"

# Every block that reached the disk before the kill is in the record
# since c2 (a granule of it is dirty).
run_ok "$BMIRROR" snapshot --control "$CTL" --export bk2 --since c2 --json
run_ok nbdinfo --map=qemu:dirty-bitmap:c2 "nbd+unix:///bk2?socket=$T/nbd.sock"
written=$(python3 - "$T/disk.raw" "$RUN_OUT" <<'PY'
import sys
dirty = []
for line in open(sys.argv[2]):
    off, length, flags = (int(x) for x in line.split()[:3])
    if flags & 1:
        dirty.append((off, off + length))
f = open(sys.argv[1], 'rb')
n = 0
for i in range(200):
    off = 8 * 1024 * 1024 + i * 4096
    f.seek(off)
    if f.read(4096) != b'\x44' * 4096:
        continue
    n += 1
    if not any(a <= off < b for a, b in dirty):
        sys.exit(f"block at {off} was written but is not in the record")
print(n)
PY
) || fail "a block written before the kill is missing from the record"
pass "the record since c2 holds the $written blocks written before the kill"
run_ok "$BMIRROR" snapshot --control "$CTL" --release bk2
stop_serve

# ---- without --track ---------------------------------------------------------
SERVE_EXTRA=()
start_serve "$T/disk.raw"
expect_fail_with 1 'does not track changes.*--track' \
	"$BMIRROR" snapshot --control "$CTL" --since c1
expect_fail_with 1 'does not track changes.*--track' \
	"$BMIRROR" checkpoint --control "$CTL" --list
run_ok "$BMIRROR" status --control "$CTL" --json
json_assert "$RUN_OUT" "'tracking' not in d" "d['snapshots'] == []"
pass "--since and checkpoints without --track are refused"
stop_serve

expect_fail_with 2 'track' \
	"$BMIRROR" serve --nbd "unix:$T/nbd2.sock" --control "$T/ctl2.sock" \
	--track= "$T/disk.raw"
pass "--track= needs a file name"
