#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Consistency groups across processes (docs/control.md, "Consistency
# groups"): two `bmirror serve` processes, disk A ("log") and disk B
# ("data"); a guest (group-writer) writes record k to A, waits for the
# acknowledgement, then writes record k to B, over and over.
#   - `bmirror snapshot --control A --control B` many times while it
#     runs: each pair of snapshots matches the model, B never holds a
#     record A does not, A is at most one ahead; the answer names both
#     servers, the group and its instant, and how long writes were held;
#   - --since and --checkpoint per disk (serve --track); a take that fails
#     on one server (an unknown checkpoint) after the other took leaves
#     neither a snapshot nor a checkpoint there;
#   - a commit whose answer is lost (a proxy drops it) after the server
#     committed: the roll back reaches that server again and releases its
#     snapshot and checkpoint; if it cannot, the one line names the server
#     and what it may still hold, and never says nothing is left;
#   - a client that holds both disks and is killed (-9) before the take:
#     the guest goes on within the lease, no snapshot or hold is left,
#     and the next group works;
#   - a client that holds and stalls: the lease lets the guest go on, the
#     group ends there (another client's snapshot is not refused), and
#     the take and commit then fail naming the lease;
#   - a server that refuses (its export name is taken) or is gone fails
#     the group with one line naming it, and the other is left with
#     nothing (no snapshot, no hold, its guest writing);
#   - bad option combinations are usage errors.
# BM_SHOW_UNGROUPED=1 also takes two separate snapshots per round and
# says how often they disagree (not asserted: it shows the test can see
# the problem the group solves).
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires python3
: "${GROUP_WRITER:=$(dirname -- "$BMIRROR")/../tests/integration/group-writer}"
[[ -x $GROUP_WRITER ]] || fail "group-writer not built: $GROUP_WRITER"

SIZE=$((1 * MiB))
A_URI="nbd+unix:///?socket=$T/a.nbd"
B_URI="nbd+unix:///?socket=$T/b.nbd"
declare -A SPID

start_one() { # start_one NAME: serve $T/NAME.raw on $T/NAME.{nbd,ctl}
	rm -f "$T/$1.nbd" "$T/$1.ctl"
	"$BMIRROR" serve --nbd "unix:$T/$1.nbd" --control "$T/$1.ctl" \
		--track "$T/$1.raw" 2>"$T/$1.err" &
	SPID[$1]=$!
	wait_for_socket "$T/$1.nbd"
	wait_for_socket "$T/$1.ctl"
}

progress() {
	local n=0
	[[ -s $T/progress ]] && read -r n <"$T/progress"
	echo "${n:-0}"
}

# wait_progress N SECONDS: until the guest has written past record N;
# fails after SECONDS.  Prints how long it took (ms).
wait_progress() {
	local n=$1 t0 deadline now
	t0=$(date +%s%N)
	deadline=$((t0 + $2 * 1000000000))
	while (($(progress) <= n)); do
		now=$(date +%s%N)
		((now < deadline)) || fail "the guest wrote nothing past record $n within $2 s"
		sleep 0.01
	done
	echo $((($(date +%s%N) - t0) / 1000000))
}

# no_leftovers NAME: the server has no snapshot and no group.
no_leftovers() {
	run_ok "$BMIRROR" snapshot --control "$T/$1.ctl" --list --json
	json_assert "$RUN_OUT" "d['snapshots'] == []"
	run_ok python3 - "$T/$1.ctl" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"cmd":"query"}\n')
f = s.makefile()
d = json.loads(f.readline())["return"]
if "group" in d or d["snapshots"]:
    sys.exit("left over: %s" % d)
EOF
}

truncate -s "$SIZE" "$T/a.raw" "$T/b.raw"
start_one a
start_one b
"$GROUP_WRITER" write "$A_URI" "$B_URI" "$T/progress" "$T/stop" 2>"$T/writer.err" &
WRITER=$!
wait_progress 100 10 >/dev/null

# ---- many groups while the guest writes ------------------------------
held_max=0
ungrouped_bad=0
for ((i = 1; i <= 25; i++)); do
	before=$(progress)
	run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --export "ga-$i" \
		--control "$T/b.ctl" --export "gb-$i" --group "g$i" --json
	json_assert "$RUN_OUT" "d['group'] == 'g$i'" \
		"[s['control'] for s in d['snapshots']] == ['$T/a.ctl', '$T/b.ctl']" \
		"[s['export'] for s in d['snapshots']] == ['ga-$i', 'gb-$i']" \
		"all(s['group'] == 'g$i' for s in d['snapshots'])" \
		"d['instant'] == min(s['instant'] for s in d['snapshots'])" \
		"isint(d['held_max_us']) and 0 < d['held_max_us'] < 1000000" \
		"d['held_max_us'] == max(s['held_us'] for s in d['snapshots'])"
	h=$(json_get "$RUN_OUT" held_max_us)
	((h > held_max)) && held_max=$h
	run "$GROUP_WRITER" check "nbd+unix:///ga-$i?socket=$T/a.nbd" \
		"nbd+unix:///gb-$i?socket=$T/b.nbd"
	((RUN_RC == 0)) || { show_run group-writer check; fail "group g$i is not one instant"; }
	read -r ra rb < <(tr '=' ' ' <"$RUN_OUT" | awk '{ print $2, $4 }')
	((ra >= before)) || fail "group g$i: A's snapshot holds record $ra, older than $before acknowledged before the group"
	run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --release "ga-$i"
	run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --release "gb-$i"
	if [[ ${BM_SHOW_UNGROUPED:-} == 1 ]]; then
		run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --export ua
		run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --export ub
		run "$GROUP_WRITER" check "nbd+unix:///ua?socket=$T/a.nbd" \
			"nbd+unix:///ub?socket=$T/b.nbd"
		((RUN_RC == 0)) || ungrouped_bad=$((ungrouped_bad + 1))
		run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --release ua
		run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --release ub
	fi
	wait_progress $((before + 20)) 10 >/dev/null
done
pass "25 groups while the guest writes: B never ahead of A, A at most one ahead (guest held at most ${held_max} us)"
[[ ${BM_SHOW_UNGROUPED:-} == 1 ]] && info "separate snapshots disagreed in $ungrouped_bad of 25 rounds"

# The text form: each server's export and URI, then the group.
run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --export ta --control "$T/b.ctl" --export tb
mapfile -t lines <"$RUN_OUT"
[[ ${#lines[@]} == 3 && ${lines[0]} == "ta nbd+unix:///ta?socket=$T/a.nbd" &&
	${lines[1]} == "tb nbd+unix:///tb?socket=$T/b.nbd" &&
	${lines[2]} =~ ^group\ group-[0-9]+-[0-9]+\ instant=[0-9.]+\ disks=2\ held_max_us=[0-9]+\ queued_max_us=[0-9]+$ ]] ||
	fail "unexpected group output: $(cat "$RUN_OUT")"
run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --list --json
json_assert "$RUN_OUT" "len(d['snapshots']) == 1" \
	"d['snapshots'][0]['group'].startswith('group-')" \
	"isint(d['snapshots'][0]['held_us'])"
run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --release ta
run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --release tb
pass "the text answer and each server's list name the group"

# ---- checkpoints per disk (serve --track) ------------------------------
run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --export c1a --checkpoint mon-a \
	--control "$T/b.ctl" --export c1b --checkpoint mon-b
run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --release c1a
run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --release c1b
wait_progress $(($(progress) + 20)) 10 >/dev/null
run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --export c2a --since mon-a \
	--control "$T/b.ctl" --export c2b --since mon-b --json
json_assert "$RUN_OUT" "[s['since'] for s in d['snapshots']] == ['mon-a', 'mon-b']" \
	"all(s['changed_bytes'] > 0 for s in d['snapshots'])"
run_ok "$GROUP_WRITER" check "nbd+unix:///c2a?socket=$T/a.nbd" "nbd+unix:///c2b?socket=$T/b.nbd"
run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --release c2a
run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --release c2b
pass "--since and --checkpoint go to the --control before them"

# A take that fails on B (an unknown checkpoint, found at the instant)
# after A took: A's snapshot and the checkpoint it made are undone.
expect_fail_with --names "$T/b.ctl" 1 'failed at the take: .*b\.ctl: snapshot-take: .*nosuch' \
	"$BMIRROR" snapshot --control "$T/a.ctl" --export x1a --checkpoint tue-a \
	--control "$T/b.ctl" --export x1b --since nosuch
no_leftovers a
no_leftovers b
run_ok "$BMIRROR" checkpoint --control "$T/a.ctl" --list --json
json_assert "$RUN_OUT" "[c['name'] for c in d['checkpoints']] == ['mon-a']"
pass "a take that fails on one server leaves no snapshot or checkpoint on the other"

# ---- a commit whose answer is lost -------------------------------------
# A proxy in front of B's control socket passes the commit on to B but
# drops B's answers from then on: B commits, and the client gives up on
# it (no answer in time).  The roll back must then reach B again and
# release what B kept; if B cannot be reached, the tool must name B as
# possibly still holding it, never claim nothing is left.
cat >"$T/proxy.py" <<'PROXY_EOF'
import socket, sys, threading
listen_path, upstream, later = sys.argv[1:4]
lsock = socket.socket(socket.AF_UNIX)
lsock.bind(listen_path)
lsock.listen(8)
def pump(src, dst, committed=None, up=True):
    # up: client to server (notes the commit); else server to client
    # (dropped once the commit went by, on the first connection).
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if up and committed is not None and b'"snapshot-commit"' in data:
                committed[0] = True
            if dst is not None and not (not up and committed and committed[0]):
                dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            if s is not None:
                s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
n = 0
while True:
    c, _ = lsock.accept()
    n += 1
    if n > 1 and later == "mute":
        # Accepted, read, never answered: a server that is stuck.
        threading.Thread(target=pump, args=(c, None), daemon=True).start()
        continue
    s = socket.socket(socket.AF_UNIX)
    s.connect(upstream)
    committed = [False] if n == 1 else None
    threading.Thread(target=pump, args=(c, s, committed, True),
                     daemon=True).start()
    threading.Thread(target=pump, args=(s, c, committed, False),
                     daemon=True).start()
PROXY_EOF
start_proxy() { # start_proxy ok|mute: what later connections get
	rm -f "$T/p.ctl"
	python3 "$T/proxy.py" "$T/p.ctl" "$T/b.ctl" "$1" &
	PROXY=$!
	wait_for_socket "$T/p.ctl"
}
stop_proxy() {
	kill "$PROXY"
	wait "$PROXY" 2>/dev/null || true
}
checkpoints_are() { # checkpoints_are NAME CHECKPOINT...
	local want
	want=$(printf "'%s', " "${@:2}")
	run_ok "$BMIRROR" checkpoint --control "$T/$1.ctl" --list --json
	json_assert "$RUN_OUT" "[c['name'] for c in d['checkpoints']] == [${want%, }]"
}

start_proxy ok
expect_fail_with --names "$T/p.ctl" 1 'failed at the commit: .*p\.ctl: no answer in time.*; no snapshot of the group is left$' \
	"$BMIRROR" snapshot --answer-ms 2000 --control "$T/a.ctl" --export la --checkpoint wed-a \
	--control "$T/p.ctl" --export lb --checkpoint wed-b
stop_proxy
no_leftovers a
no_leftovers b
checkpoints_are a mon-a
checkpoints_are b mon-b
pass "a commit whose answer is lost: the server that committed is reached again and left with nothing"

start_proxy mute
expect_fail_with --names "$T/p.ctl" 1 'failed at the commit: .*p\.ctl may still hold the group.s snapshot lb2 and checkpoint thu-b \(release it with bmirror snapshot --control [^ ]*p\.ctl --release lb2\)' \
	"$BMIRROR" snapshot --answer-ms 2000 --control "$T/a.ctl" --export la2 --checkpoint thu-a \
	--control "$T/p.ctl" --export lb2 --checkpoint thu-b
if grep -q "no snapshot of the group is left" "$RUN_ERR"; then
	fail "the tool claims nothing is left: $(cat "$RUN_ERR")"
fi
stop_proxy
no_leftovers a
checkpoints_are a mon-a
run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --list --json
json_assert "$RUN_OUT" "[s['export'] for s in d['snapshots']] == ['lb2']"
checkpoints_are b mon-b thu-b
run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --release lb2
run_ok "$BMIRROR" checkpoint --control "$T/b.ctl" --remove thu-b
no_leftovers b
pass "a commit whose answer is lost, its server unreachable after: the tool names it and what it may hold"

# ---- a client that holds, then dies before the take -------------------
# It holds both disks with a 5 s lease, sees the guest stand still, and
# is killed.
n=$(progress)
run python3 - "$T" <<'EOF'
import json, os, signal, socket, sys, time
T = sys.argv[1]
def progress():
    return int(open(T + "/progress").read().split()[0])
cs = []
for name in ("a", "b"):
    s = socket.socket(socket.AF_UNIX)
    s.connect("%s/%s.ctl" % (T, name))
    s.sendall(json.dumps({"cmd": "snapshot-hold", "group": "doomed",
                          "export": "doomed", "lease_ms": 5000}).encode()
              + b"\n")
    cs.append(s)
for s in cs:
    a = json.loads(s.makefile().readline())
    if a.get("return", {}).get("held") is not True:
        sys.exit("hold refused: %s" % a)
p0 = progress()
time.sleep(0.3)
p1 = progress()
if p1 > p0 + 1:
    sys.exit("the guest wrote %d records while both disks were held"
             % (p1 - p0))
os.kill(os.getpid(), signal.SIGKILL)
EOF
((RUN_RC == 137)) || { show_run python3 hold-and-die; fail "the holding client was not killed as planned"; }
ms=$(wait_progress "$(progress)" 5)
no_leftovers a
no_leftovers b
grep -q "group doomed went away" "$T/a.err" || fail "server A did not say it dropped the group: $(cat "$T/a.err")"
pass "a client killed while holding: the guest went on after ${ms} ms (lease 5000), nothing left"

run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --export na --control "$T/b.ctl" --export nb
run_ok "$GROUP_WRITER" check "nbd+unix:///na?socket=$T/a.nbd" "nbd+unix:///nb?socket=$T/b.nbd"
run_ok "$BMIRROR" snapshot --control "$T/a.ctl" --release na
run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --release nb
pass "the next group works"

# ---- a client that holds and stalls: the lease lets the guest go -------
run python3 - "$T" <<'EOF'
import json, socket, sys, time
T = sys.argv[1]
def progress():
    return int(open(T + "/progress").read().split()[0])
s = socket.socket(socket.AF_UNIX)
s.connect(T + "/a.ctl")
f = s.makefile()
def ask(o):
    s.sendall(json.dumps(o).encode() + b"\n")
    return json.loads(f.readline())
t0 = time.monotonic()
a = ask({"cmd": "snapshot-hold", "group": "stall", "lease_ms": 400})
if a.get("return", {}).get("held") is not True:
    sys.exit("hold refused: %s" % a)
p0 = progress()
while progress() <= p0 + 1:
    if time.monotonic() - t0 > 5:
        sys.exit("the guest did not go on after the lease")
    time.sleep(0.01)
waited = time.monotonic() - t0
if waited < 0.3:
    sys.exit("the guest went on after %.3f s, before the 400 ms lease" % waited)
# The lease's end ends the group: another client's snapshot is not
# refused meanwhile (errno 16) while the holder stays silent.
q = ask({"cmd": "query"})["return"]
if "group" in q:
    sys.exit("the group outlived its lease: %s" % q["group"])
o = socket.socket(socket.AF_UNIX)
o.connect(T + "/a.ctl")
o.sendall(b'{"cmd":"snapshot","export":"other"}\n')
a = json.loads(o.makefile().readline())
if a.get("return", {}).get("export") != "other":
    sys.exit("a snapshot after the lease ran out: %s" % a)
o.sendall(b'{"cmd":"snapshot-release","export":"other"}\n')
a = json.loads(o.makefile().readline())
if "return" not in a:
    sys.exit("release: %s" % a)
for cmd in ("take", "commit"):
    a = ask({"cmd": "snapshot-" + cmd, "group": "stall"})
    e = a.get("error", {})
    if e.get("errno") != 110 or "lease of 400 ms ran out before the " \
            + cmd not in e.get("message", ""):
        sys.exit("%s after the lease: %s" % (cmd, a))
a = ask({"cmd": "snapshot-abort", "group": "stall"})
if a.get("return", {}).get("expired") is not True:
    sys.exit("abort after the lease: %s" % a)
print("%d" % (waited * 1000))
EOF
((RUN_RC == 0)) || { show_run python3 hold-and-stall; fail "the lease did not end a stalled hold"; }
ms=$(cat "$RUN_OUT")
no_leftovers a
grep -q "group stall ran out of its lease (400 ms)" "$T/a.err" || fail "server A did not say the group ended: $(cat "$T/a.err")"
pass "a stalled hold: the guest went on after ${ms} ms (lease 400), the group ended there (another snapshot worked), the take and commit failed naming the lease"

# ---- a server that refuses --------------------------------------------
run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --export taken
n=$(progress)
expect_fail_with --names "$T/b.ctl" 1 'group .* failed at the hold: .*b\.ctl: snapshot-hold: taken: a snapshot is exported under that name' \
	"$BMIRROR" snapshot --control "$T/a.ctl" --export taken-a --control "$T/b.ctl" --export taken
no_leftovers a
wait_progress "$n" 5 >/dev/null
run_ok "$BMIRROR" snapshot --control "$T/b.ctl" --release taken
no_leftovers b
pass "a server that refuses fails the group naming it; the other holds nothing"

# The same server twice: its second hold is refused, its first let go.
n=$(progress)
expect_fail_with --names "$T/a.ctl" 1 "a\.ctl: snapshot-hold: group .* holds this disk's snapshots" \
	"$BMIRROR" snapshot --control "$T/a.ctl" --control "$T/a.ctl"
no_leftovers a
wait_progress "$n" 5 >/dev/null
pass "the same server twice in a group is refused, and let go"

# ---- usage -------------------------------------------------------------
expect_fail_with 2 'lease-ms' "$BMIRROR" snapshot --control "$T/a.ctl" \
	--control "$T/b.ctl" --lease-ms 0
expect_fail_with 2 'lease-ms' "$BMIRROR" snapshot --control "$T/a.ctl" \
	--control "$T/b.ctl" --lease-ms 60001
expect_fail_with 2 'answer-ms' "$BMIRROR" snapshot --control "$T/a.ctl" \
	--control "$T/b.ctl" --answer-ms 0
expect_fail_with 2 'for a group' "$BMIRROR" snapshot --control "$T/a.ctl" \
	--answer-ms 5000
expect_fail_with 2 'follow the --control' "$BMIRROR" snapshot --export x \
	--control "$T/a.ctl" --control "$T/b.ctl"
expect_fail_with 2 'several --control' "$BMIRROR" snapshot --control "$T/a.ctl" --group g
expect_fail_with 2 'one --control' "$BMIRROR" snapshot --control "$T/a.ctl" \
	--control "$T/b.ctl" --list
no_leftovers a
no_leftovers b
pass "bad option combinations are usage errors"

# ---- a server that is gone ---------------------------------------------
touch "$T/stop"
wait "$WRITER" || { cat "$T/writer.err" >&2; fail "the guest failed"; }
kill -9 "${SPID[b]}"
wait "${SPID[b]}" 2>/dev/null || true
expect_fail_with --names "$T/b.ctl" 1 'group .* failed at the connect: .*b\.ctl: cannot connect' \
	"$BMIRROR" snapshot --control "$T/a.ctl" --control "$T/b.ctl"
no_leftovers a
pass "a server that is gone fails the group naming it"
kill -TERM "${SPID[a]}"
wait "${SPID[a]}" || fail "serve A exited with $? on SIGTERM"
