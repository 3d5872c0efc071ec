#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Snapshots from the command line (docs/snapshot.md, docs/control.md):
# `bmirror serve` exports a 64 MiB disk of random data; qemu-io writes a
# pattern through it; `bmirror snapshot` takes a snapshot and the server
# exports it.  A copy of the disk right after is the instant.  Then fio
# writes at random through the main export while qemu-img copies the
# snapshot's export: the copy equals the instant, the disk does not.
# Block status of the snapshot works, the counters show old data saved,
# a release removes the export, bad input is refused naming what is
# wrong, and a snapshot survives a move of the served disk with a pivot.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires fio qemu-img qemu-io nbdinfo
fio --enghelp 2>/dev/null | grep -qw nbd || skip_test "fio has no nbd engine"

SIZE=$((64 * MiB))
MAIN="nbd+unix:///?socket=$T/nbd.sock"

head -c "$SIZE" /dev/urandom >"$T/disk.raw"
start_serve "$T/disk.raw"

# Pattern A through the main export, then the snapshot.
run_ok qemu-io -f raw -c "write -P 0xa5 1M 4M" "$MAIN"
run_ok "$BMIRROR" snapshot --control "$T/ctl.sock" --export snap-a
read -r name uri <"$RUN_OUT"
[[ $name == snap-a && $uri == "nbd+unix:///snap-a?socket=$T/nbd.sock" ]] ||
	fail "unexpected snapshot output: $(cat "$RUN_OUT")"
pass "bmirror snapshot prints the export and its URI"
run_ok qemu-img convert -f raw -O raw "$MAIN" "$T/instant.raw"
run_ok qemu-io -f raw -r -c "read -P 0xa5 1M 4M" "$T/instant.raw"

run_ok nbdinfo --list "nbd+unix:///?socket=$T/nbd.sock"
grep -q 'snap-a' "$RUN_OUT" || { cat "$RUN_OUT" >&2; fail "nbdinfo --list does not show snap-a"; }
pass "the server lists the snapshot's export"

fio --name=guest --ioengine=nbd --uri="$MAIN" --rw=randwrite --bs=64k \
	--iodepth=8 --size=100% --time_based --runtime=4 --randseed=7 \
	--output="$T/fio.out" >/dev/null 2>&1 &
fio_pid=$!
sleep 0.5
run_ok qemu-img convert -f raw -O raw "$uri" "$T/snap.raw"
wait "$fio_pid" || { cat "$T/fio.out" >&2; fail "fio failed"; }
run_ok qemu-img compare -f raw -F raw "$T/instant.raw" "$T/snap.raw"
pass "the snapshot read while fio wrote equals the instant"
run qemu-img compare -f raw -F raw "$MAIN" "$T/instant.raw"
((RUN_RC == 1)) || { show_run qemu-img compare; fail "the disk still equals the instant after fio wrote"; }
pass "the disk itself moved on"

run_ok qemu-img map --output=json -f raw "$uri"
grep -q '"data": true' "$RUN_OUT" || fail "qemu-img map of the snapshot shows no data"
run_ok nbdinfo --map "$uri"
pass "block status of the snapshot export"

run qemu-io -f raw -c "write -P 0x11 0 64k" "$uri"
((RUN_RC != 0)) || fail "a write to the snapshot's export succeeded"
pass "the snapshot's export refuses writes"

run_ok "$BMIRROR" snapshot --control "$T/ctl.sock" --list --json
json_assert "$RUN_OUT" "len(d['snapshots']) == 1" \
	"d['snapshots'][0]['export'] == 'snap-a'" \
	"d['snapshots'][0]['bytes_saved'] > 0" \
	"d['snapshots'][0]['state'] == 'active'"
pass "--list --json shows the snapshot with old data saved"

run_ok "$BMIRROR" snapshot --control "$T/ctl.sock" --release snap-a
run nbdinfo "$uri"
((RUN_RC != 0)) || fail "the export is still there after release"
grep -qi 'snap-a\|export' "$RUN_ERR" || { cat "$RUN_ERR" >&2; fail "no clear error for a released export"; }
run_ok "$BMIRROR" snapshot --control "$T/ctl.sock" --list --json
json_assert "$RUN_OUT" "d['snapshots'] == []"
pass "release removes the export"

# ---- bad input ---------------------------------------------------------
expect_fail_with --names nosuch 1 'no such snapshot' \
	"$BMIRROR" snapshot --control "$T/ctl.sock" --release nosuch
expect_fail_with 2 'timeout-ms' \
	"$BMIRROR" snapshot --control "$T/ctl.sock" --timeout-ms abc
expect_fail_with 2 'control' "$BMIRROR" snapshot --list
expect_fail_with 2 'release' \
	"$BMIRROR" snapshot --control "$T/ctl.sock" --release x --list
pass "bad input is refused"

# ---- a snapshot survives a move of the served disk ---------------------
run_ok "$BMIRROR" snapshot --control "$T/ctl.sock"
read -r name uri <"$RUN_OUT"
[[ $name == snap-1 ]] || fail "default name is $name, not snap-1"
run_ok qemu-img convert -f raw -O raw "$MAIN" "$T/instant2.raw"
run_ok qemu-io -f raw -c "write -P 0x5a 0 8M" "$MAIN"
run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/moved.raw"
run_ok "$BMIRROR" status --control "$T/ctl.sock" --json
json_assert "$RUN_OUT" "d['image'] == '$T/moved.raw'"
run_ok qemu-io -f raw -c "write -P 0x3c 8M 8M" "$MAIN"
run_ok qemu-img convert -f raw -O raw "$uri" "$T/snap2.raw"
run_ok qemu-img compare -f raw -F raw "$T/instant2.raw" "$T/snap2.raw"
pass "the snapshot survives a move with a pivot"

# quit releases what is left.
stop_serve
pass "the server stops with a snapshot exported"

# ---- a confined server: scratch images only inside --allow-dir ------------
mkdir -p "$T/ok" "$T/other"
rm -f "$T/nbd.sock" "$T/ctl.sock"
"$BMIRROR" serve --nbd "unix:$T/nbd.sock" --control "$T/ctl.sock" \
	--allow-dir "$T/ok" "$T/disk.raw" 2>"$T/serve.err" &
SERVE_PID=$!
wait_for_socket "$T/nbd.sock"
wait_for_socket "$T/ctl.sock"
expect_fail_with --names "$T/other/s.raw" 1 'allow-dir' \
	"$BMIRROR" snapshot --control "$T/ctl.sock" --scratch "$T/other/s.raw"
[[ ! -e $T/other/s.raw ]] || fail "a refused scratch was created"
expect_fail_with --names "$T/other" 1 'allow-dir' \
	"$BMIRROR" snapshot --control "$T/ctl.sock" --scratch-dir "$T/other"
ln -s "$T/other" "$T/ok/link"
expect_fail_with 1 'allow-dir' \
	"$BMIRROR" snapshot --control "$T/ctl.sock" --scratch "$T/ok/link/s.raw"
[[ ! -e $T/other/s.raw ]] || fail "a scratch was created through a link"
run_ok "$BMIRROR" snapshot --control "$T/ctl.sock" --scratch "$T/ok/s.raw" \
	--export inside
[[ -f $T/ok/s.raw ]] || fail "the allowed scratch was not created"
run_ok "$BMIRROR" snapshot --control "$T/ctl.sock" --release inside
[[ ! -e $T/ok/s.raw ]] || fail "the created scratch was not removed at release"
pass "a confined server makes scratch images only inside --allow-dir"
stop_serve

# A snapshot whose scratch may hold only 64 KiB breaks at the first
# larger overwrite; the guest's write succeeds, and every control client
# is told once, with the reason, without asking.
start_serve "$T/disk.raw"
run_ok python3 - "$T/ctl.sock" "$MAIN" <<'EOF'
import json, socket, subprocess, sys, time
def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.settimeout(10)
    return s, s.makefile('rw')
s, f = connect()
w, wf = connect()                # a bystander: it hears it too
f.write(json.dumps({'cmd': 'snapshot', 'export': 'small',
                    'max_scratch': 65536}) + '\n')
f.flush()
r = json.loads(f.readline())
assert 'return' in r, r
subprocess.run(['qemu-io', '-f', 'raw', '-c', 'write -P 0x3c 2M 1M',
                sys.argv[2]], check=True, stdout=subprocess.DEVNULL)
for fh in (f, wf):
    deadline = time.time() + 10
    while True:
        assert time.time() < deadline, 'no SNAPSHOT_BROKEN'
        ev = json.loads(fh.readline())
        if ev.get('event') == 'SNAPSHOT_BROKEN':
            break
    assert ev['export'] == 'small' and 'max_scratch' in ev['reason'], ev
# Once: a second write tells nobody again; the next line is the answer.
subprocess.run(['qemu-io', '-f', 'raw', '-c', 'write -P 0x3d 2M 1M',
                sys.argv[2]], check=True, stdout=subprocess.DEVNULL)
f.write(json.dumps({'cmd': 'query'}) + '\n')
f.flush()
r = json.loads(f.readline())
assert 'return' in r, r
snaps = [x for x in r['return']['snapshots'] if x['export'] == 'small']
assert snaps and snaps[0]['state'] == 'broken', r
EOF
run_ok qemu-io -f raw -r -c "read -P 0x3d 2M 1M" "$MAIN"
expect_fail_with nonzero '' qemu-img convert -f raw -O raw \
	"nbd+unix:///small?socket=$T/nbd.sock" "$T/broken.raw"
pass "a snapshot that breaks is told to every control client, once; the guest went on"
stop_serve
