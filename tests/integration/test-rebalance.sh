#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# bmirror rebalance (docs/rebalance.md) against real served disks:
#  - three directory pools (one small), six disks served by `bmirror serve`
#    with fio writing to each (nbd engine, crc32c verify headers) and two
#    unused images: balance them.  Every disk verifies afterwards, the
#    pools end within the tolerance, a sampler watching the pool
#    directories never sees a pool over its capacity, and the event log
#    never shows more than --max-parallel moves at once;
#  - a pool evacuated while one destination is an NBD pool behind
#    nbdkit's error filter: that disk stays where it was, the others move;
#  - SIGINT in the middle: the running moves are cancelled, nothing is
#    left behind, every disk is where it was;
#  - bad plans are refused before anything moves, naming the problem.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires fio nbdkit python3
fio --enghelp 2>/dev/null | grep -qw nbd || skip_test "fio has no nbd engine"

SERVE_PIDS=()

wait_for_socket() {
	local i
	for ((i = 0; i < 200; i++)); do
		[[ -S $1 ]] && return 0
		sleep 0.05
	done
	fail "timed out waiting for $1"
}

# serve NAME IMAGE: serve IMAGE through the link $T/NAME.link.
serve() {
	ln -sfn "$2" "$T/$1.link"
	"$BMIRROR" serve --nbd "unix:$T/$1.nbd" --control "$T/$1.ctl" \
		--link "$T/$1.link" 2>"$T/$1.serve.err" &
	SERVE_PIDS+=($!)
	wait_for_socket "$T/$1.nbd"
	wait_for_socket "$T/$1.ctl"
}

stop_all() {
	local p rc
	for p in "${SERVE_PIDS[@]}"; do
		kill -TERM "$p" 2>/dev/null || true
	done
	for p in "${SERVE_PIDS[@]}"; do
		rc=0
		wait "$p" || rc=$?
		((rc == 0)) || fail "bmirror serve (pid $p) exited with $rc"
	done
	SERVE_PIDS=()
}

# served_image NAME: the file the served disk runs on (links resolved).
served_image() {
	run_ok "$BMIRROR" status --control "$T/$1.ctl" --json
	readlink -f -- "$(json_get "$RUN_OUT" image)"
}

FIO_COMMON=(--ioengine=nbd --rw=randwrite --bs=4k --iodepth=8 --size=8M
	--verify=crc32c --randseed=77 --verify_state_save=0)
fio_write() { # fio_write NAME RATE_IOPS
	fio --name="$1" "${FIO_COMMON[@]}" --uri="nbd+unix:///?socket=$T/$1.nbd" \
		--do_verify=0 --rate_iops="$2" --output="$T/$1.fio" >/dev/null 2>&1
}
fio_verify() {
	run fio --name="$1" "${FIO_COMMON[@]}" --uri="nbd+unix:///?socket=$T/$1.nbd" \
		--verify_only --output="$T/$1.fio-verify"
	if ((RUN_RC != 0)) || ! grep -q "err= 0" "$T/$1.fio-verify"; then
		cat "$T/$1.fio-verify" >&2
		fail "fio verify of $1 failed"
	fi
}

# Watch the pool directories: the largest total of file sizes each ever
# held, one "NAME MAX" line per pool in OUT once stopped.  It returns once
# the sampler is watching (OUT.ready), however slowly python starts, so
# that it sees all that follows and a SIGTERM finds its handler.
start_sampler() { # start_sampler OUT NAME=DIR...
	local i
	rm -f "$1.ready"
	python3 - "$@" <<'EOF' &
import os, signal, sys, time
out, pools = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
peak = {n: 0 for n, _ in pools}
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
first = True
while not stop:
    for n, d in pools:
        tot = 0
        for e in os.scandir(d):
            try:
                tot += e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
        peak[n] = max(peak[n], tot)
    if first:
        open(out + ".ready", "w").close()
        first = False
    time.sleep(0.01)
with open(out, "w") as f:
    for n, v in peak.items():
        print(n, v, file=f)
EOF
	SAMPLER_PID=$!
	for ((i = 0; i < 1200; i++)); do
		[[ -e $1.ready ]] && return 0
		kill -0 "$SAMPLER_PID" 2>/dev/null || fail "the pool sampler died"
		sleep 0.05
	done
	fail "the pool sampler did not start in 60 s"
}
stop_sampler() {
	kill -TERM "$SAMPLER_PID"
	wait "$SAMPLER_PID" || true
}

# ---- six served disks and two images over three pools: balance --------
mkdir -p "$T/p1" "$T/p2" "$T/p3"
sizes=(32 32 24 24 16 16)
for i in 1 2 3 4 5 6; do
	head -c "${sizes[i - 1]}M" /dev/urandom >"$T/p1/s$i.raw"
	serve "s$i" "$T/p1/s$i.raw"
done
head -c 16M /dev/urandom >"$T/p1/u1.raw"
head -c 16M /dev/urandom >"$T/p2/u2.raw"
sum_u1=$(checksum "$T/p1/u1.raw")
sum_u2=$(checksum "$T/p2/u2.raw")

cat >"$T/plan.json" <<EOF
{
  "version": 1,
  "pools": [
    {"name": "p1", "path": "$T/p1", "capacity": "192M"},
    {"name": "p2", "path": "$T/p2", "capacity": "192M"},
    {"name": "p3", "path": "$T/p3", "capacity": "48M"}
  ],
  "disks": [
    {"name": "u1", "image": "$T/p1/u1.raw"}, {"name": "u2", "image": "$T/p2/u2.raw"},
    {"name": "s1", "control": "$T/s1.ctl"}, {"name": "s2", "control": "$T/s2.ctl"},
    {"name": "s3", "control": "$T/s3.ctl"}, {"name": "s4", "control": "$T/s4.ctl"},
    {"name": "s5", "control": "$T/s5.ctl"}, {"name": "s6", "control": "$T/s6.ctl"}
  ],
  "goal": {"type": "balance", "tolerance": 0.15}
}
EOF

run_ok "$BMIRROR" rebalance "$T/plan.json" --dry-run
grep -q '^move ' "$RUN_OUT" || { show_run dry-run; fail "--dry-run printed no move"; }
[[ -f $T/p1/s1.raw && -z $(ls -A "$T/p3") ]] || fail "--dry-run moved something"
run_ok "$BMIRROR" rebalance "$T/plan.json" --dry-run --json
cp "$RUN_OUT" "$T/dry.json"
json_assert "$T/dry.json" "d['event'] == 'plan' and len(d['moves']) >= 3" \
	"all(p['used_after'] <= p['capacity'] for p in d['pools'])"
pass "--dry-run prints the plan and moves nothing"

for i in 1 2 3 4 5 6; do
	fio_write "s$i" 600 &
	eval "fio$i=\$!"
done
sleep 0.5
start_sampler "$T/peak" p1="$T/p1" p2="$T/p2" p3="$T/p3"
t0=$(date +%s.%N)
run_ok "$BMIRROR" rebalance "$T/plan.json" --json --max-parallel 2 --speed 48M
t1=$(date +%s.%N)
cp "$RUN_OUT" "$T/events"
stop_sampler
for i in 1 2 3 4 5 6; do
	eval "wait \$fio$i" || { cat "$T/s$i.fio" >&2; fail "fio on s$i saw an error during the rebalance"; }
done
info "rebalance took $(python3 -c "print(round($t1 - $t0, 2))") s"
pass "rebalance of 6 served disks under fio and 2 images ended well"

python3 - "$T/events" "$T/peak" 2 <<'EOF' || fail "the event log or the pools are not right"
import json, sys
events = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
peak = dict(l.split() for l in open(sys.argv[2]))
limit = int(sys.argv[3])
plan = events[0]
assert plan["event"] == "plan", plan
cap = {p["name"]: p["capacity"] for p in plan["pools"]}
summary = events[-1]
assert summary.get("summary") == "done", summary
assert set(summary["moved"]) == {m["disk"] for m in plan["moves"]}, summary
hows = {m["how"] for m in plan["moves"]}
assert hows == {"live", "offline"}, f"want live and offline moves: {plan}"
running = maxrun = 0
for e in events[1:-1]:
    if e["event"] == "start":
        running += 1
    elif e["event"] in ("done", "failed"):
        running -= 1
    maxrun = max(maxrun, running)
    for p, used in e.get("pools", {}).items():
        assert used <= cap[p], f"{p} accounted {used} > {cap[p]}: {e}"
assert 1 <= maxrun <= limit, f"{maxrun} moves ran at once (limit {limit})"
for p, v in peak.items():
    assert int(v) <= cap[p], f"pool {p} held {v} bytes > capacity {cap[p]}"
print(f"# moves: {len(plan['moves'])}, at most {maxrun} at once, "
      f"{summary['bytes_copied']} bytes copied in {summary['elapsed_s']:.2f} s; "
      f"peaks {peak}")
EOF
pass "at most 2 moves ran at once and no pool ever held more than its capacity"

# Every disk is whole: fio's headers through the served disk, and the
# unused images byte for byte at their new place.
for i in 1 2 3 4 5 6; do
	fio_verify "s$i"
	img=$(served_image "s$i")
	[[ -f $img && $(readlink -f "$T/s$i.link") == "$img" ]] ||
		fail "s$i: served image $img and its link do not agree"
done
pass "fio verifies on every served disk; every link names its image"
for u in u1 u2; do
	n=$(find "$T/p1" "$T/p2" "$T/p3" -name "$u.raw" | wc -l)
	((n == 1)) || fail "$u exists $n times"
done
[[ $(checksum "$T"/p?/u1.raw) == "$sum_u1" && $(checksum "$T"/p?/u2.raw) == "$sum_u2" ]] ||
	fail "an unused image changed on its way"
[[ -z $(find "$T/p1" "$T/p2" "$T/p3" -name '.*') ]] || fail "temporary files left behind"
pass "the unused images moved intact, nothing left behind"

python3 - "$T" 0.15 <<'EOF' || fail "the pools are not within the tolerance"
import os, sys
t, tol = sys.argv[1], float(sys.argv[2])
cap = {"p1": 192, "p2": 192, "p3": 48}
used = {p: sum(e.stat().st_size for e in os.scandir(f"{t}/{p}")) / 2**20 for p in cap}
mean = sum(used.values()) / sum(cap.values())
for p in cap:
    f = used[p] / cap[p]
    assert abs(f - mean) <= tol + 1e-9, f"{p}: {f:.3f} vs mean {mean:.3f}"
print("# usage:", {p: f"{used[p]:.0f}M/{cap[p]}M" for p in cap})
EOF
pass "every pool ends within the tolerance of the mean used fraction"

# A second run has nothing to do (the plan names the images where they
# are now).
python3 - "$T/plan.json" "$T"/p?/u1.raw "$T"/p?/u2.raw <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
d["disks"][0]["image"], d["disks"][1]["image"] = sys.argv[2], sys.argv[3]
json.dump(d, open(sys.argv[1], "w"))
EOF
run_ok "$BMIRROR" rebalance "$T/plan.json" --json
tail -n 1 "$RUN_OUT" >"$T/s.json"
json_assert "$T/s.json" "d['summary'] == 'done' and d['moves'] == 0"
pass "a balanced set of pools needs no move"

# ---- bad plans: refused before anything moves ----------------------------
bad_plan() { # bad_plan PATTERN NAME < plan text
	cat >"$T/bad.json"
	expect_fail_with --names "$2" 1 "$1" "$BMIRROR" rebalance "$T/bad.json"
}
echo '{"pools": [' | bad_plan "malformed JSON" "bad.json"
sed 's/"to-be-replaced"//' "$T/plan.json" |
	python3 -c 'import json,sys; d=json.load(sys.stdin); d["goal"]={"type":"evacuate","pool":"nowhere"}; print(json.dumps(d))' |
	bad_plan "unknown pool" "nowhere"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["disks"].append({"name":"ghost","control":sys.argv[2]}); print(json.dumps(d))' \
	"$T/plan.json" "$T/ghost.ctl" | bad_plan "cannot connect" "ghost"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["disks"].append({"name":"lost","image":sys.argv[2]}); print(json.dumps(d))' \
	"$T/plan.json" "$T/p1/lost.raw" | bad_plan "no such file" "lost"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["pools"][2]["capacity"]="8M"; print(json.dumps(d))' \
	"$T/plan.json" | bad_plan "over capacity" "p3"
img=$(served_image s1)
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["disks"].append({"name":"busy","image":sys.argv[2]}); print(json.dumps(d))' \
	"$T/plan.json" "$img" | bad_plan "served|in use" "busy"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["goal"]={"type":"moves","moves":[{"disk":"s1","to":"p3"},{"disk":"s2","to":"p3"}]}; print(json.dumps(d))' \
	"$T/plan.json" | bad_plan "overfill" "p3"
pass "bad plans are refused, naming the problem, before anything moves"
stop_all

# ---- evacuation with a failing destination --------------------------------
mkdir -p "$T/e1" "$T/e2"
for i in 1 2 3; do
	head -c 16M /dev/urandom >"$T/e1/v$i.raw"
	serve "v$i" "$T/e1/v$i.raw"
	fio_write "v$i" 0
done
rm -f "$T/err.sock"
nbdkit --exit-with-parent -f -U "$T/err.sock" --filter=error memory 16M \
	error-pwrite-rate=100% error-pwrite=EIO &
wait_for_socket "$T/err.sock"
cat >"$T/evac.json" <<EOF
{
  "pools": [
    {"name": "e1", "path": "$T/e1", "capacity": "64M"},
    {"name": "e2", "path": "$T/e2", "capacity": "32M"},
    {"name": "broken", "uri": "nbd+unix:///{name}?socket=$T/err.sock", "capacity": "16M"}
  ],
  "disks": [
    {"name": "v1", "control": "$T/v1.ctl"}, {"name": "v2", "control": "$T/v2.ctl"},
    {"name": "v3", "control": "$T/v3.ctl"}
  ],
  "goal": {"type": "evacuate", "pool": "e1"}
}
EOF
run "$BMIRROR" rebalance "$T/evac.json" --json --max-parallel 3
((RUN_RC == 1)) || { show_run rebalance evac; fail "a rebalance with a failed move must exit 1"; }
cp "$RUN_OUT" "$T/evac.events"
victim=$(python3 - "$T/evac.events" <<'EOF'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
plan, s = ev[0], ev[-1]
assert len(plan["moves"]) == 3, plan
bad = [m["disk"] for m in plan["moves"] if m["to"] == "broken"]
assert len(bad) == 1, plan
assert s["summary"] == "failed" and s["failed"] == bad, s
assert sorted(s["moved"]) == sorted(m["disk"] for m in plan["moves"] if m["to"] == "e2"), s
assert any(e.get("event") == "failed" and e["disk"] == bad[0] and e["message"] for e in ev), ev
print(bad[0])
EOF
) || { cat "$T/evac.events" >&2; fail "the evacuation's events are wrong"; }
for i in 1 2 3; do
	img=$(served_image "v$i")
	if [[ v$i == "$victim" ]]; then
		[[ $img == "$T/e1/v$i.raw" ]] || fail "v$i failed to move but runs on $img"
	else
		[[ $img == "$T/e2/v$i.raw" && ! -e $T/e1/v$i.raw ]] || fail "v$i should have moved to e2 (runs on $img)"
	fi
	fio_verify "v$i"
done
pass "evacuation: the move to the failing pool left $victim in place, the others moved"
stop_all

# ---- SIGINT in the middle --------------------------------------------------
mkdir -p "$T/i1" "$T/i2"
head -c 16M /dev/urandom >"$T/i1/w1.raw"
head -c 16M /dev/urandom >"$T/i1/w2.raw"
serve w1 "$T/i1/w1.raw"
sum_w2=$(checksum "$T/i1/w2.raw")
cat >"$T/int.json" <<EOF
{
  "pools": [{"name": "i1", "path": "$T/i1", "capacity": "64M"},
            {"name": "i2", "path": "$T/i2", "capacity": "64M"}],
  "disks": [{"name": "w1", "control": "$T/w1.ctl"}, {"name": "w2", "image": "$T/i1/w2.raw"}],
  "goal": {"type": "evacuate", "pool": "i1"}
}
EOF
"$BMIRROR" rebalance "$T/int.json" --json --speed 4M >"$T/int.events" 2>"$T/int.err" &
rb=$!
# Both moves under way (a progress event of each, a second in), however
# slowly they start; at 2 MiB/s each, some 14 MiB of each to go.
wait_rebalance_progress "$T/int.events" "$rb" w1 w2
kill -INT "$rb"
rc=0
wait "$rb" || rc=$?
((rc == 1)) || { cat "$T/int.events" "$T/int.err" >&2; fail "an interrupted rebalance must exit 1 (got $rc)"; }
tail -n 1 "$T/int.events" >"$T/int.sum"
json_assert "$T/int.sum" "d['summary'] == 'interrupted'" \
	"sorted(d['cancelled']) == ['w1', 'w2'] and d['moved'] == []"
[[ $(served_image w1) == "$T/i1/w1.raw" ]] || fail "w1 left its pool after SIGINT"
[[ -z $(ls -A "$T/i2") ]] || { ls -la "$T/i2" >&2; fail "SIGINT left files in the destination pool"; }
[[ $(checksum "$T/i1/w2.raw") == "$sum_w2" ]] || fail "w2 changed"
pass "SIGINT cancels the running moves and reports them; nothing is left behind"
stop_all

# ---- qcow2 and VHDX images move offline in their own format -------------
mkdir -p "$T/f1" "$T/f2"
make_mixed_image "$T/fmt-orig.raw"
run_ok "$BMIRROR" copy -O qcow2 "$T/fmt-orig.raw" "$T/f1/q.qcow2"
run_ok "$BMIRROR" copy -O vhdx -o block_size=1M "$T/fmt-orig.raw" "$T/f1/v.vhdx"
cat >"$T/fmt.json" <<EOF2
{
  "version": 1,
  "pools": [{"name": "f1", "path": "$T/f1", "capacity": "64M"},
            {"name": "f2", "path": "$T/f2", "capacity": "64M"}],
  "disks": [{"name": "q", "image": "$T/f1/q.qcow2"}, {"name": "v", "image": "$T/f1/v.vhdx"}],
  "goal": {"type": "evacuate", "pool": "f1"}
}
EOF2
run_ok "$BMIRROR" rebalance "$T/fmt.json"
[[ ! -e $T/f1/q.qcow2 && ! -e $T/f1/v.vhdx ]] || fail "the images are still in f1"
run_ok qemu-img check -f qcow2 "$T/f2/q.qcow2"
run_ok qemu-img check -f vhdx "$T/f2/v.vhdx"
run_ok qemu-img compare -f raw -F qcow2 "$T/fmt-orig.raw" "$T/f2/q.qcow2"
run_ok qemu-img compare -f raw -F vhdx "$T/fmt-orig.raw" "$T/f2/v.vhdx"
pass "qcow2 and VHDX images evacuate offline, still qcow2 and VHDX, data intact"
