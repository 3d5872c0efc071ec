#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# bmirror rebalance's offline moves (docs/rebalance.md), which copy on
# library threads of the rebalance process (blockmirror_copy_start):
#  - a paced evacuation of two images ends well: each copy gets half of
#    --speed, the images arrive intact, no temporary file is left, the
#    sources are gone;
#  - SIGTERM in the middle of two copies: the copies are threads, not
#    child processes; both are cancelled and reported so, no temporary
#    file is left in the destination pool, and the sources are where they
#    were, unchanged.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires python3

# images SIZE: pools a and b, images d1 and d2 of SIZE random bytes in
# a (their checksums in sum1, sum2).
images() {
	rm -rf "$T/a" "$T/b"
	mkdir -p "$T/a" "$T/b"
	head -c "$1" /dev/urandom >"$T/a/d1.raw"
	head -c "$1" /dev/urandom >"$T/a/d2.raw"
	sum1=$(checksum "$T/a/d1.raw")
	sum2=$(checksum "$T/a/d2.raw")
}

# plan FILE: evacuate pool a (holding d1 and d2) to pool b.
plan() {
	cat >"$1" <<EOF
{
  "version": 1,
  "pools": [{"name": "a", "path": "$T/a", "capacity": "256M"},
            {"name": "b", "path": "$T/b", "capacity": "256M"}],
  "disks": [{"name": "d1", "image": "$T/a/d1.raw"}, {"name": "d2", "image": "$T/a/d2.raw"}],
  "goal": {"type": "evacuate", "pool": "a"}
}
EOF
}

# check_pace EVENTS SHARE...: every progress event shows one of the
# shares of the budget and no more done than that share allows (with a
# wide margin: a busy machine only ever makes a copy slower).
check_pace() {
	python3 - "$@" <<'EOF' || { cat "$1" >&2; fail "the copies did not keep to their share of --speed"; }
import json, sys
shares = [int(a) for a in sys.argv[2:]]
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
prog = [e for e in ev if e.get("event") == "progress"]
assert prog, "no progress event"
for e in prog:
    assert e["speed"] in shares, e
    assert e["done"] <= 2 * max(shares) * e["elapsed_s"] + (4 << 20), e
print(f"# {len(prog)} progress events, at most "
      f"{max(e['done'] / max(e['elapsed_s'], 1e-3) for e in prog) / 2**20:.1f} MiB/s")
EOF
}

# ---- a paced evacuation that ends well ----------------------------------------
images 6M
plan "$T/ok.json"
run_ok "$BMIRROR" rebalance "$T/ok.json" --json --max-parallel 2 --speed 4M
cp "$RUN_OUT" "$T/ok.events"
tail -n 1 "$T/ok.events" >"$T/ok.sum"
json_assert "$T/ok.sum" "d['summary'] == 'done'" "sorted(d['moved']) == ['d1', 'd2']" \
	"d['elapsed_s'] >= 1.0"
# Half each, or all of it for the one left running.
check_pace "$T/ok.events" $((2 * 1024 * 1024)) $((4 * 1024 * 1024))
[[ $(checksum "$T/b/d1.raw") == "$sum1" && $(checksum "$T/b/d2.raw") == "$sum2" ]] ||
	fail "an image changed on its way"
[[ -z $(ls -A "$T/a") ]] || fail "the sources are still in pool a: $(ls -A "$T/a")"
[[ -z $(find "$T/b" -name '.*') ]] || fail "temporary files left behind"
pass "a paced offline evacuation splits --speed between its copies and ends intact"

# ---- SIGTERM in the middle ------------------------------------------------------
images 64M
plan "$T/term.json"
"$BMIRROR" rebalance "$T/term.json" --json --max-parallel 2 --speed 8M \
	>"$T/term.events" 2>"$T/term.err" &
rb=$!
# Both copies under way: their temporary files are there.
for ((i = 0; i < 200; i++)); do
	(($(find "$T/b" -name '.*.rebalance-*' | wc -l) == 2)) && break
	sleep 0.05
done
(($(find "$T/b" -name '.*.rebalance-*' | wc -l) == 2)) ||
	{ ls -la "$T/b" >&2; fail "the two copies did not start"; }
# Both copies a second in (a progress event of each, which check_pace
# needs), and so both started for sure: their threads are created after
# their temporary files.  At 4 MiB/s each, some 60 MiB of each to go.
wait_rebalance_progress "$T/term.events" "$rb" d1 d2
kids=$(cat /proc/"$rb"/task/*/children 2>/dev/null | tr -d ' ')
[[ -z $kids ]] || fail "rebalance runs child processes: $kids"
(($(ls /proc/"$rb"/task | wc -l) >= 3)) || fail "no copy threads in the rebalance process"
pass "offline copies run on threads of the rebalance process"
(($(find "$T/b" -name '.*.rebalance-*' | wc -l) == 2)) ||
	{ ls -la "$T/b" >&2; fail "a copy ended before the SIGTERM"; }
kill -TERM "$rb"
rc=0
wait "$rb" || rc=$?
((rc == 1)) || { cat "$T/term.events" "$T/term.err" >&2; fail "a rebalance ended by SIGTERM must exit 1 (got $rc)"; }
tail -n 1 "$T/term.events" >"$T/term.sum"
json_assert "$T/term.sum" "d['summary'] == 'interrupted'" \
	"sorted(d['cancelled']) == ['d1', 'd2'] and d['moved'] == [] and d['failed'] == []"
python3 - "$T/term.events" <<'EOF' || { cat "$T/term.events" >&2; fail "the failed events are wrong"; }
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
failed = [e for e in ev if e.get("event") == "failed"]
assert sorted(e["disk"] for e in failed) == ["d1", "d2"], failed
assert all(e["cancelled"] and e["message"] == "cancelled" for e in failed), failed
EOF
check_pace "$T/term.events" $((4 * 1024 * 1024))
[[ -z $(ls -A "$T/b") ]] || { ls -la "$T/b" >&2; fail "SIGTERM left files in the destination pool"; }
[[ $(checksum "$T/a/d1.raw") == "$sum1" && $(checksum "$T/a/d2.raw") == "$sum2" ]] ||
	fail "a source changed"
pass "SIGTERM cancels the offline copies: no temporary file left, the sources intact"
