#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Backups of a served disk while fio writes to it (docs/backup.md):
#   - fio (crc32c-verified 4 KiB random writes over NBD) is stopped, the
#     disk is copied with qemu-img (the instant), and a backup is started;
#     fio goes on as soon as the backup reports its snapshot taken
#     (backup_at_instant, functions.sh), and writes while the point is
#     copied;
#   - every point (full, then incremental by the change record that
#     `bmirror serve --track` keeps) restores to exactly its instant copy
#     (qemu-img compare), and an incremental point reads about what
#     changed, not the disk;
#   - `bmirror backup verify --control` rereads the chain and checks the
#     live disk where the record says nothing changed;
#   - fio's own verify of the disk passes at the end: no write was lost.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io fio python3 nbdkit

SIZE=$((64 * MiB))
CTL=$T/ctl.sock
MAIN="nbd+unix:///?socket=$T/nbd.sock"
DIR=$T/backups
# fio keeps to the disk's first 48 MiB (its verify too: fio_verify uses
# FIO_COMMON, and the last --size wins); the last 16 MiB are written only
# by this script, so what changes there, and when, is known.
FIO_COMMON+=(--size=$((48 * MiB)))
TAIL=$((48 * MiB))

head -c "$SIZE" /dev/urandom >"$T/disk.raw"
SERVE_EXTRA=(--track)
start_serve "$T/disk.raw"

# --thread: one process, so that SIGSTOP stops its writes.
fio "${FIO_COMMON[@]}" --thread --uri="$MAIN" --do_verify=0 --rate_iops=1100 \
	--output="$T/fio.out" >/dev/null 2>&1 &
FIO=$!
sleep 1

# point N [--incremental]: fio stopped, 64 KiB of pattern N written at
# TAIL + N MiB (so that every point has a change since the one before,
# however early fio ends), the instant copied, then the backup, fio let
# go once the backup reports its snapshot taken.  fio may have written
# its every block already on a slow machine: then a stand-in is stopped.
point() {
	local n=$1 f=$FIO
	shift
	kill -STOP "$FIO" 2>/dev/null || { sleep 600 & f=$!; }
	run_ok qemu-io -f raw -c "write -P $((0x50 + n)) $((TAIL + n * MiB)) 64k" "$MAIN"
	backup_at_instant "$f" "$T/at$n.raw" "$T/b$n.out" --to "$DIR" "$@"
	[[ $f == "$FIO" ]] || { kill "$f"; wait "$f" 2>/dev/null || true; }
	((BACKUP_RC == 0)) || { cat "$T/b$n.out.err" >&2; fail "backup $n failed"; }
}

point 1
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0001.qcow2" "$T/at1.raw"
pass "full point of a disk being written equals its instant"

sleep 1
point 2 --incremental
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0002.qcow2" "$T/at2.raw"
sleep 1
point 3 --incremental
run_ok qemu-img compare -q -f qcow2 -F raw "$DIR/0003.qcow2" "$T/at3.raw"
run_ok qemu-img check -q "$DIR/0003.qcow2"
pass "incremental points by the change record equal their instants"

# The record, not digests: about what fio wrote between the points, far
# less than the disk, and at least the granule point() wrote.
# The result (the last line of the output, after the events).
for n in 2 3; do
	tail -n 1 "$T/b$n.out" >"$T/b$n.json"
	json_assert "$T/b$n.json" "d['healed'] is False" "d['incremental'] is True" \
		"d['bytes_read'] == d['bytes_changed']" \
		"65536 <= d['bytes_changed'] <= $SIZE"
done
run_ok "$BMIRROR" backup list "$DIR" --json
json_assert "$RUN_OUT" "len(d['points']) == 3" \
	"all(p['checkpoint'] for p in d['points'])"
run_ok python3 - "$T/at2.raw" "$T/at3.raw" "$DIR/0003.json" <<'EOF'
import json, sys
a, b = open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read()
g = json.load(open(sys.argv[3]))['granularity']
differ = sum(a[i:i + g] != b[i:i + g] for i in range(0, len(a), g))
print(f'{differ} granules differ between instants 2 and 3')
assert differ > 0
EOF
pass "points carry their checkpoints"

# Freeze and thaw hooks around the server's instant: the client runs the
# freeze, the server takes the snapshot and says so, the client thaws.
run_ok "$BMIRROR" backup --control "$CTL" --to "$DIR" --incremental --json \
	--freeze-cmd "echo frozen >> $T/hook" --thaw-cmd "echo thawed >> $T/hook"
tail -n 1 "$RUN_OUT" >"$T/b4.json"
json_assert "$T/b4.json" "d['consistency'] == 'application'" "d['point'] == 4"
[[ $(cat "$T/hook") == $'frozen\nthawed' ]] || fail "hooks ran as: $(cat "$T/hook")"
# fio writes every block once: let it finish (so that it can verify, and
# so that after point 5 only this script writes to the disk).
kill -CONT "$FIO" 2>/dev/null || true
wait "$FIO" || { cat "$T/fio.out" >&2; fail "fio failed while writing"; }
run_ok "$BMIRROR" backup --control "$CTL" --to "$DIR" --incremental --json \
	--freeze-cmd "exit 1" --thaw-cmd "echo thawed >> $T/hook"
tail -n 1 "$RUN_OUT" >"$T/b5.json"
json_assert "$T/b5.json" "d['consistency'] == 'crash'"
[[ $(tail -n 1 "$T/hook") == thawed ]] || fail "no thaw after a failed freeze"
pass "freeze and thaw around a served disk's instant"

# The backup runs beside the control socket: asked from the thaw hook,
# i.e. while the backup is copying, status answers at once and shows it,
# and a second backup is refused.  The point goes to an export held
# paused (nbdkit's pause filter) until the hook has asked, so the backup
# is still running then on any machine; the hook resumes it last.
nbdkit -f --exit-with-parent -U "$T/held.sock" --filter=pause memory "$SIZE" \
	pause-control="$T/held.ctl" 2>"$T/held.err" &
HELD=$!
wait_for_socket "$T/held.ctl"
wait_for_socket "$T/held.sock"
cat >"$T/held.py" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode())
assert s.recv(1) == sys.argv[2].upper().encode()
EOF
run_ok python3 "$T/held.py" "$T/held.ctl" p
run_ok "$BMIRROR" backup --control "$CTL" --to "nbd+unix:///?socket=$T/held.sock" \
	--catalog "$T/heldcat" --json \
	--thaw-cmd "'$BMIRROR' status --control '$CTL' --json > '$T/st.json';
		'$BMIRROR' backup --control '$CTL' --to '$T/other' 2> '$T/second.err';
		python3 '$T/held.py' '$T/held.ctl' r"
json_assert "$T/st.json" "d['backup']['taken'] is True" \
	"d['backup']['dir'].endswith('/heldcat')"
grep -q 'a backup is running' "$T/second.err" || fail "a second backup: $(cat "$T/second.err")"
kill "$HELD"
wait "$HELD" 2>/dev/null || true
pass "control commands answered while a backup runs; one backup at a time"

# Since point 5 nothing but this write changed the disk: the live check
# reads every granule but the ones it touched (and would find a mismatch
# there if it read them, or if the record had missed the write).
run_ok qemu-io -f raw -c "write -P 0x5a $((TAIL + 8 * MiB)) 1M" "$MAIN"
all=$(python3 -c 'import json, sys
g = json.load(open(sys.argv[1]))["granularity"]
first, last = sys.argv[2:4]
print(int(sys.argv[4]) - ((int(last) - 1) // g - int(first) // g + 1) * g)' \
	"$DIR/0005.json" $((TAIL + 8 * MiB)) $((TAIL + 9 * MiB)) "$SIZE")
run_ok "$BMIRROR" backup verify "$DIR" --control "$CTL" --json
[[ $(events_in "$RUN_OUT") == "$(printf 'POINT_VERIFIED %.0s' 1 2 3 4 5)LIVE_VERIFIED" ]] ||
	fail "the events of verify over the control socket: $(events_in "$RUN_OUT")"
tail -n 1 "$RUN_OUT" >"$T/verify.json"
json_assert "$T/verify.json" "d['points'] == 5" "d['live_bytes_read'] == $all" \
	"d['live_mismatches'] == 0"
pass "verify over the control socket: the chain and the live disk"
echo "verify: the live check read $all bytes"
run_ok "$BMIRROR" backup verify "$DIR" --control "$CTL" --sample 30 --json
tail -n 1 "$RUN_OUT" >"$T/verify.json"
json_assert "$T/verify.json" "d['points'] == 5" "d['live_mismatches'] == 0" \
	"0 < d['live_bytes_read'] < $all * 0.6"
expect_fail_with 2 'needs --against or --control' "$BMIRROR" backup verify "$DIR" --sample 30
expect_fail_with 2 'percentage from 1 to 100' "$BMIRROR" backup verify "$DIR" --control "$CTL" --sample 101
pass "verify --sample: a part of the live disk, chosen anew each run"

expect_fail_with 2 'needs --to' "$BMIRROR" backup --control "$CTL" --to ""
run_ok python3 - "$CTL" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile('rw')
for cmd, want in (({'cmd': 'backup'}, 'backup needs "dir"'),
                  ({'cmd': 'backup', 'dir': '/nonexistent/x'}, '/nonexistent'),
                  ({'cmd': 'backup', 'dir': '/tmp', 'incremental': 'yes'},
                   'must be true or false')):
    f.write(json.dumps(cmd) + '\n')
    f.flush()
    r = json.loads(f.readline())
    while 'event' in r:   # a backup that began says each step first
        r = json.loads(f.readline())
    assert 'error' in r and want in r['error']['message'], r
EOF
fio_verify "after the backups"
pass "fio verifies every write it made"

# quit while a backup copies: the server stops it, leaves no point, and
# exits 0; the client says the server went away.  The point goes into an
# export held paused (nbdkit's pause filter) until the hook has had quit's
# answer, i.e. until the server has left its loop to stop the backup, and
# whose writes take 50 ms each after that (nbdkit's delay filter): the
# copy cannot end before the quit on any machine.
nbdkit -f --exit-with-parent -U "$T/slow.sock" --filter=pause --filter=delay \
	memory "$SIZE" pause-control="$T/slow.ctl" delay-write=50ms 2>"$T/slow.err" &
SLOW=$!
wait_for_socket "$T/slow.ctl"
wait_for_socket "$T/slow.sock"
run_ok python3 "$T/held.py" "$T/slow.ctl" p
run "$BMIRROR" backup --control "$CTL" --to "nbd+unix:///?socket=$T/slow.sock" \
	--catalog "$T/slowcat" \
	--thaw-cmd "python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b\"{\\\"cmd\\\": \\\"quit\\\"}\\n\"); assert b\"return\" in s.recv(100)' '$CTL' > '$T/quit.out' 2>&1;
		python3 '$T/held.py' '$T/slow.ctl' r"
((RUN_RC == 1)) || { show_run backup; fail "backup during quit: exit $RUN_RC"; }
[[ ! -s $T/quit.out ]] || fail "quit from the hook: $(cat "$T/quit.out")"
rc=0
wait "$SERVE_PID" || rc=$?
((rc == 0)) || { cat "$T/serve.err" >&2; fail "serve exited $rc after quit during a backup"; }
SERVE_PID=
kill "$SLOW"
wait "$SLOW" 2>/dev/null || true
[[ -z $(ls -A -- "$T/slowcat" | grep -v '^\.bmirror-backup\.lock$') ]] ||
	{ ls -la "$T/slowcat" >&2; fail "a cancelled backup left files in its catalogue"; }
pass "quit during a backup: cancelled, no point left, the server exits 0"

# held_export NAME FILE N: FILE served on $T/NAME.sock by nbdkit's sh
# plugin (one request at a time), HELD_PID: the first N writes go through;
# the next one waits, $T/NAME.held saying so, until $T/NAME.release
# exists or nbdkit has gone (a minute at most), and then fails.
cat >"$T/held-export.sh" <<'EOF'
#!/bin/sh
case $1 in
get_size) stat -Lc %s "$HELD_FILE" ;;
can_write) exit 0 ;;
pread) exec dd if="$HELD_FILE" iflag=skip_bytes,count_bytes skip="$4" count="$3" \
	bs=64K status=none ;;
pwrite)
	if [ "$(stat -c %s "$HELD.writes")" -lt "$HELD_N" ]; then
		printf x >>"$HELD.writes"
		exec dd of="$HELD_FILE" oflag=seek_bytes seek="$4" conv=notrunc \
			iflag=fullblock,count_bytes count="$3" bs=64K status=none
	fi
	: >"$HELD.held"
	i=0
	while [ ! -e "$HELD.release" ] && kill -0 "$PPID" 2>/dev/null && [ $i -lt 1200 ]; do
		sleep 0.05
		i=$((i + 1))
	done
	echo 'EIO held, then let go' >&2
	exit 1 ;;
*) exit 2 ;;
esac
EOF
chmod +x "$T/held-export.sh"
held_export() {
	local name=$1
	rm -f -- "$T/$name.sock" "$T/$name.held" "$T/$name.release"
	: >"$T/$name.writes"
	HELD=$T/$name HELD_FILE=$2 HELD_N=$3 nbdkit -f --exit-with-parent \
		-U "$T/$name.sock" sh "$T/held-export.sh" 2>"$T/$name.err" &
	HELD_PID=$!
	wait_for_socket "$T/$name.sock"
}

# kill -9 of the server during a backup, then a restart: the next
# backup is still incremental (no healing), holds every write since the
# last point that exists, and equals the disk.  The backup killed goes
# into an export that takes 32 of its writes and holds the next: the
# kill lands while it copies, on any machine.  (Points into an export, in
# a catalogue of their own: only a backup into an export can be held.)
start_serve "$T/disk.raw"
KCAT=$T/kcat
truncate -s "$SIZE" "$T/kexp.raw"
nbdkit -f --exit-with-parent -U "$T/kexp.sock" file "$T/kexp.raw" 2>"$T/kexp.err" &
KEXP=$!
wait_for_socket "$T/kexp.sock"
run_ok "$BMIRROR" backup --control "$CTL" --to "nbd+unix:///?socket=$T/kexp.sock" \
	--catalog "$KCAT"
run_ok qemu-io -f raw -c "write -P 0x6b 4M 32M" "$MAIN"
held_export kheld "$T/kexp.raw" 32
"$BMIRROR" backup --control "$CTL" --to "nbd+unix:///?socket=$T/kheld.sock" \
	--catalog "$KCAT" --incremental --json >"$T/dead.out" 2>"$T/dead.err" &
b=$!
for ((i = 0; i < 1200; i++)); do
	[[ -e $T/kheld.held ]] && break
	kill -0 "$b" 2>/dev/null || break
	sleep 0.05
done
[[ -e $T/kheld.held ]] ||
	{ cat "$T/dead.err" >&2; fail "the backup to be killed never came to its 33rd write"; }
kill -9 "$SERVE_PID"
wait "$b" && fail "the backup of a killed server said it succeeded"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=
touch "$T/kheld.release"
kill "$HELD_PID"
wait "$HELD_PID" 2>/dev/null || true
[[ $(cd -- "$KCAT" && echo *.json) == 0001.json ]] || fail "a killed backup left a point"
cmp -s -- "$T/kexp.raw" "$T/disk.raw" && fail "the killed backup wrote all of it: no test"
start_serve "$T/disk.raw"
grep -q crashed "$T/serve.err" || fail "the restarted server did not say the tracker crashed"
run_ok qemu-io -f raw -c "write -P 0x6c 60M 64k" "$MAIN"
run_ok "$BMIRROR" backup --control "$CTL" --to "nbd+unix:///?socket=$T/kexp.sock" \
	--catalog "$KCAT" --incremental --json
tail -n 1 "$RUN_OUT" >"$T/after-kill.json"
json_assert "$T/after-kill.json" "d['healed'] is False" "d['point'] == 2" \
	"d['bytes_changed'] >= 32 * 2**20 + 65536"
stop_serve
kill "$KEXP"
wait "$KEXP" 2>/dev/null || true
run_ok cmp -- "$T/kexp.raw" "$T/disk.raw"
pass "kill -9 of the server during a backup: the next one is incremental and whole"
