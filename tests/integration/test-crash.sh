#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Crash-resumable moves (docs/state.md): `bmirror serve --link` is killed
# with SIGKILL at a random moment of a move while a guest writes through
# it, then started again on the same link.  CRASH_ITERATIONS times
# (default 50), cycling through active and background mode and raw, qcow2
# and NBD (qemu-nbd) destinations.  After each restart:
#
#   - the disk the link names holds every write the guest saw complete
#     before the kill (and, for the one write in flight, the old or the new
#     block);
#   - a move that was in progress resumed by itself ("resumed": true in
#     status), copied no more than the regions the state marked dirty, and
#     pivoted; a qcow2 destination passes qemu-img check (leaked clusters,
#     which a crash may leave, are counted, not failed);
#   - the state directory is gone once the move is over.
#
# Then: a state whose bitmap fails its checksum is reported and the move
# restarts from a full copy; a state whose record fails its checksum is
# reported and not used.
#
# Why not fio: fio's verify needs every block it would write to have been
# written, and it records what completed only on a clean exit, so it cannot
# say which writes completed before a server was killed.  The guest here is
# a small NBD client (Python, below) that writes 4 KiB blocks one at a
# time, each block's content a function of (block, sequence number), and
# appends "W block seq" to a log before sending a write and "A seq" once
# the server acknowledged it.  The guest process survives the kill (only
# the server dies), so its log is complete: the expected content of each
# block is its last acknowledged write (or the original data), and a write
# logged but never acknowledged may or may not have landed.  Reading goes
# through the restarted server, i.e. what the guest would see.
# shellcheck source=functions.sh
. "$(dirname -- "$0")/functions.sh"

requires qemu-img qemu-nbd python3

ITER=${CRASH_ITERATIONS:-50}
SIZE=$((32 * MiB))
BLOCKS=$((SIZE / 4096))

cat >"$T/guest.py" <<'EOF'
import os, random, socket, struct, sys, time

def connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    def rx(n):
        b = bytearray()
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c:
                raise EOFError("server went away")
            b += c
        return bytes(b)
    _, _, flags = struct.unpack(">QQH", rx(18))
    s.sendall(struct.pack(">I", 3 if flags & 2 else 1))
    data = struct.pack(">I", 0) + struct.pack(">H", 0)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
    while True:
        _, _, typ, ln = struct.unpack(">QIII", rx(20))
        rx(ln)
        if typ == 1:
            break
        if typ & 0x80000000:
            raise RuntimeError("NBD_OPT_GO refused: 0x%x" % typ)
    return s, rx

def request(s, rx, typ, off, ln, data=b""):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, typ, 1, off, ln) + data)
    magic, err, _ = struct.unpack(">IIQ", rx(16))
    if magic != 0x67446698:
        raise RuntimeError("unexpected reply magic 0x%x" % magic)
    if err:
        raise OSError(err, "NBD error %d" % err)
    return rx(ln) if typ == 0 else None

def payload(blk, seq):
    return struct.pack("<QQ", blk, seq) * 256

cmd, sock = sys.argv[1], sys.argv[2]
if cmd == "write":
    log, seed, blocks = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    rnd = random.Random(seed)
    s, rx = connect(sock)
    with open(log, "w", buffering=1) as f:
        seq, t0 = 0, time.monotonic()
        while True:
            seq += 1
            # Mostly a hot quarter of the disk, as guests do; the rest
            # stays quiet long enough for its regions to be cleared.
            if rnd.random() < 0.995:
                blk = rnd.randrange(blocks // 4)
            else:
                blk = rnd.randrange(blocks)
            f.write("W %d %d\n" % (blk, seq))
            try:
                request(s, rx, 1, blk * 4096, 4096, payload(blk, seq))
            except (OSError, EOFError, RuntimeError):
                break
            f.write("A %d\n" % seq)
            if seq % 20 == 0:  # about 1000 writes a second
                ahead = seq / 1000.0 - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
elif cmd == "verify":
    log, orig, blocks = sys.argv[3], sys.argv[4], int(sys.argv[5])
    issued, last, acked = {}, {}, set()
    for line in open(log):
        p = line.split()
        if len(p) == 3 and p[0] == "W":
            issued[int(p[2])] = int(p[1])
        elif len(p) == 2 and p[0] == "A":
            seq = int(p[1])
            acked.add(seq)
            last[issued[seq]] = seq
    inflight = {}
    for seq, blk in issued.items():
        if seq not in acked and seq > last.get(blk, 0):
            inflight.setdefault(blk, []).append(seq)
    s, rx = connect(sock)
    data = bytearray()
    for off in range(0, blocks * 4096, 1 << 20):
        data += request(s, rx, 0, off, 1 << 20)
    o = open(orig, "rb").read()
    bad = 0
    for blk in range(blocks):
        got = bytes(data[blk * 4096:(blk + 1) * 4096])
        ok = [payload(blk, last[blk]) if blk in last else o[blk * 4096:(blk + 1) * 4096]]
        ok += [payload(blk, q) for q in inflight.get(blk, [])]
        if got not in ok:
            bad += 1
            if bad <= 5:
                print("block %d: not what the guest last wrote (seq %s)" % (blk, last.get(blk)), file=sys.stderr)
    print("%d acked writes, %d in flight, %d bad blocks" % (len(acked), sum(map(len, inflight.values())), bad))
    sys.exit(1 if bad else 0)
EOF

head -c "$SIZE" /dev/urandom >"$T/orig.raw"
W=$T/w
LINK=$W/disk
STATE=$W/disk.bmirror-state
QEMU_NBD_PID=

status_json() { # status_json OUT
	"$BMIRROR" status --control "$T/ctl.sock" --json >"$1" 2>&1 ||
		{ cat "$1" "$T/serve.err" >&2; fail "bmirror status failed"; }
}

py() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

# wait_move_over: poll status until the move is no longer running (a
# bound that only catches a hang: the move runs unlimited, but the machine
# may be slow and loaded).
wait_move_over() {
	local st end=$((SECONDS + 180))
	while ((SECONDS < end)); do
		status_json "$T/st.json"
		st=$(py "$T/st.json" '(d.get("job") or {}).get("state", "none")')
		case $st in
		completed | none) return 0 ;;
		failed | cancelled) cat "$T/st.json" "$T/serve.err" >&2; fail "the resumed move ended $st" ;;
		esac
		sleep 0.1
	done
	cat "$T/st.json" >&2
	fail "the resumed move did not finish in 180 s"
}

# wait_guest_writing PID LOG WHAT: until the guest PID has had a write
# acknowledged (an "A" line in LOG), i.e. it has connected, done the
# handshake and is in its write loop, where the server going away ends it
# well.  60 s at most, however slowly python starts here.
wait_guest_writing() {
	local end=$((SECONDS + 60))
	while ! grep -q '^A ' "$2" 2>/dev/null; do
		kill -0 "$1" 2>/dev/null || { wait "$1"; fail "$3: the guest failed before its first write"; }
		((SECONDS < end)) || fail "$3: the guest had no write acknowledged in 60 s"
		sleep 0.02
	done
}

stop_qemu_nbd() {
	if [[ -n $QEMU_NBD_PID ]]; then
		kill "$QEMU_NBD_PID" 2>/dev/null || true
		wait "$QEMU_NBD_PID" 2>/dev/null || true
		QEMU_NBD_PID=
	fi
}

resumed=0 partial=0 switched=0 fresh=0 done_before=0 writes=0 leaks=0 killed=0
t_start=$SECONDS
for ((i = 0; i < ITER; i++)); do
	modes=(active background)
	mode=${modes[i % 2]}
	kinds=(raw qcow2 nbd)
	kind=${kinds[i % 3]}
	rm -rf -- "$W"
	mkdir -p -- "$W"
	cp -- "$T/orig.raw" "$W/src.raw"
	ln -s -- "$W/src.raw" "$LINK"
	case $kind in
	raw) dest=$W/dst.raw fmt=(-O raw) ;;
	qcow2) dest=$W/dst.qcow2 fmt=(-O qcow2) ;;
	nbd)
		truncate -s "$SIZE" "$W/ndst.raw"
		rm -f "$T/q.sock"
		qemu-nbd -f raw --socket="$T/q.sock" --persistent -x '' "$W/ndst.raw" &
		QEMU_NBD_PID=$!
		wait_for_socket "$T/q.sock"
		dest="nbd+unix:///?socket=$T/q.sock" fmt=()
		;;
	esac
	start_serve "$LINK" --link
	python3 "$T/guest.py" write "$T/nbd.sock" "$W/guest.log" "$i" "$BLOCKS" &
	guest=$!
	# The guest writes before the move starts and the kill's clock runs,
	# so that a kill however early finds it past its handshake, on any
	# machine: the kill's moment counts from the move's start alone.
	wait_guest_writing "$guest" "$W/guest.log" "iteration $i"
	# A random moment: while mapping, copying, READY or pivoting, or after.
	delay=$(python3 -c "import random; print(random.Random($i * 7919).uniform(0.05, 2.7))")
	"$BMIRROR" move --control "$T/ctl.sock" --to "$dest" "${fmt[@]}" --mode "$mode" \
		--speed 12M --json >"$W/move.out" 2>&1 &
	mover=$!
	sleep "$delay"
	kill -9 "$SERVE_PID"
	wait "$SERVE_PID" 2>/dev/null || true
	killed=$((killed + 1))
	wait "$guest" || fail "iteration $i: the guest failed"
	wait "$mover" || true

	start_serve "$LINK" --link
	status_json "$W/found.json"
	what=$(py "$W/found.json" '"resumed" if (d.get("resume") or {}).get("resumed") else (d.get("resume") or {}).get("phase", "none")')
	case $what in
	resumed)
		resumed=$((resumed + 1))
		wait_move_over
		copied=$(py "$T/st.json" 'd["job"]["bytes_copied"]')
		dirty=$(py "$W/found.json" 'd["resume"]["bytes_dirty"]')
		((copied <= dirty)) || fail "iteration $i: the resumed move copied $copied bytes, more than the $dirty bytes the state marked dirty"
		((dirty < SIZE)) && partial=$((partial + 1))
		[[ $(readlink "$LINK") == "$dest" ]] || fail "iteration $i: the resumed move did not pivot"
		;;
	switched) switched=$((switched + 1)) ;;
	none)
		if [[ $(readlink "$LINK") == "$dest" ]]; then
			done_before=$((done_before + 1)) what=pivoted
		else
			fresh=$((fresh + 1))
		fi
		;;
	*) cat "$W/found.json" "$T/serve.err" >&2; fail "iteration $i: unexpected start-up: $what" ;;
	esac
	run python3 "$T/guest.py" verify "$T/nbd.sock" "$W/guest.log" "$T/orig.raw" "$BLOCKS"
	((RUN_RC == 0)) || { cat "$RUN_ERR" "$W/found.json" "$T/serve.err" >&2; fail "iteration $i ($mode, $kind, $what): lost writes: $(cat "$RUN_OUT")"; }
	writes=$((writes + $(awk '{print $1; exit}' "$RUN_OUT")))
	info "iteration $i: $mode, $kind: $what ($(py "$W/found.json" '(d.get("resume") or {}).get("regions_dirty")') regions dirty); $(cat "$RUN_OUT")"
	stop_serve
	[[ ! -e $STATE ]] || { ls -la "$STATE" >&2; fail "iteration $i ($what): the state directory outlived the move"; }
	if [[ $kind == qcow2 && $(readlink "$LINK") == "$dest" ]]; then
		run qemu-img check -f qcow2 "$dest"
		case $RUN_RC in
		0) ;;
		3) leaks=$((leaks + 1)) ;;
		*) show_run qemu-img check -f qcow2 "$dest"; fail "iteration $i: qemu-img check found corruption" ;;
		esac
	fi
	stop_qemu_nbd
done
((ITER < 10 || partial > 0)) || fail "no resumed move started from a partly clean state"
pass "$killed kills survived ($resumed resumed, $partial of them from a partly clean state, $switched after the switch, $done_before after the move had ended, $fresh before it began), $writes acknowledged writes checked, none lost; $leaks qcow2 destinations with leaked clusters; $((SECONDS - t_start)) s"

# ---- a state that fails its checks is never trusted ---------------------
# crash_mid_move: a raw move killed part-way, on any machine: once its
# state is on disk and a quarter of the disk is copied; at 4 MiB/s the
# other 24 MiB take 6 s more however fast the machine is.
crash_mid_move() {
	local mover got end=$((SECONDS + 120))
	rm -rf -- "$W"
	mkdir -p -- "$W"
	cp -- "$T/orig.raw" "$W/src.raw"
	ln -s -- "$W/src.raw" "$LINK"
	start_serve "$LINK" --link
	"$BMIRROR" move --control "$T/ctl.sock" --to "$W/dst.raw" --speed 4M --json >"$W/move.out" 2>&1 &
	mover=$!
	while :; do
		status_json "$W/mid.json"
		got=$(py "$W/mid.json" '(d.get("job") or {}).get("bytes_done", 0)')
		[[ -f $STATE/state ]] && ((got >= SIZE / 4)) && break
		kill -0 "$mover" 2>/dev/null || { cat "$W/move.out" "$T/serve.err" >&2; fail "the move ended before the kill"; }
		((SECONDS < end)) || { cat "$W/mid.json" >&2; fail "the move copied no quarter of the disk in 120 s"; }
		sleep 0.05
	done
	((got < SIZE)) || fail "the move was not part-way at the kill ($got bytes done)"
	kill -9 "$SERVE_PID"
	wait "$SERVE_PID" 2>/dev/null || true
	wait "$mover" || true
	[[ -f $STATE/state ]] || fail "no state after a crash mid-move"
	[[ $(readlink "$LINK") == "$W/src.raw" ]] || fail "the move had pivoted before the kill"
}

crash_mid_move
# Both bitmap slots (at 4 KiB and 8 KiB for a 32 MiB disk) lose their check.
flip_byte "$STATE/state" $((4096 + 20))
flip_byte "$STATE/state" $((8192 + 20))
start_serve "$LINK" --link
grep -q "invalid state, not trusted" "$T/serve.err" || { cat "$T/serve.err" >&2; fail "a corrupt bitmap was not reported on stderr"; }
status_json "$W/found.json"
json_assert "$W/found.json" 'd["resume"]["resumed"] is False' '"no valid slot" in d["resume"]["error"]' \
	'd["resume"].get("full_copy") is True'
wait_move_over
copied=$(py "$T/st.json" 'd["job"]["bytes_copied"]')
((copied == SIZE)) || fail "after a corrupt bitmap the move copied $copied bytes, not the whole disk"
[[ $(readlink "$LINK") == "$W/dst.raw" ]] || fail "the restarted move did not pivot"
stop_serve
cmp -- "$T/orig.raw" "$W/dst.raw" || fail "the restarted move's destination differs"
pass "a state whose bitmap fails its checksum is reported and the move restarts from a full copy"

crash_mid_move
flip_byte "$STATE/state" 100
start_serve "$LINK" --link
grep -q "invalid state, not trusted" "$T/serve.err" || { cat "$T/serve.err" >&2; fail "a corrupt record was not reported on stderr"; }
status_json "$W/found.json"
json_assert "$W/found.json" 'd["resume"]["resumed"] is False' '"checksum" in d["resume"]["error"]' \
	'd["job"] is None'
[[ $(readlink "$LINK") == "$W/src.raw" && ! -e $STATE ]] || fail "a corrupt record was used or kept"
stop_serve
cmp -- "$T/orig.raw" "$W/src.raw" || fail "the source changed"
pass "a state whose record fails its checksum is reported and not used"

# ---- a crash after the switch: the state goes, the destination stays ----
# The window between the durable rename and the state's removal is too
# short to hit by chance: re-point the link by hand, as the pivot does.
crash_mid_move
ln -sfn -- "$W/dst.raw" "$LINK"
start_serve "$LINK" --link
status_json "$W/found.json"
json_assert "$W/found.json" 'd["resume"]["phase"] == "switched"' 'd["job"] is None'
[[ ! -e $STATE ]] || fail "the state outlived a durable switch"
stop_serve
pass "a state found after the switch is removed and the destination served"

# ---- a crash before the state file was in place -------------------------
# A move killed between making its state directory and renaming its state
# file into place leaves the directory empty, or holding only the file's
# temporary: no move to take up, and the directory goes at start-up.  (The
# kill loop above lands there only on a slow machine: by hand.)
for left in empty tmp; do
	rm -rf -- "$W"
	mkdir -p -- "$W"
	cp -- "$T/orig.raw" "$W/src.raw"
	ln -sfn -- "$W/src.raw" "$LINK"
	mkdir -- "$STATE"
	[[ $left == tmp ]] && head -c 12288 /dev/urandom >"$STATE/state.tmp"
	start_serve "$LINK" --link
	status_json "$W/found.json"
	json_assert "$W/found.json" 'd["job"] is None'
	stop_serve
	[[ ! -e $STATE ]] || fail "a state directory left before its file was in place ($left) outlived start-up"
	cmp -- "$T/orig.raw" "$W/src.raw" || fail "the source changed"
done
pass "a state directory a move was killed in before its file was written goes at start-up"
