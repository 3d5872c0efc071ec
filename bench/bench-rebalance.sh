#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# bench-rebalance: the time of a rebalance that moves six served disks
# (with a light fio writer on each) run in parallel against the same moves
# one after another, and the aggregate throughput under a --speed cap.
#
#   bench/bench-rebalance.sh [BMIRROR] [DISK_MIB] [CAP]
#
# BMIRROR defaults to build/tools/bmirror, DISK_MIB to 128 (each disk,
# random data so that every byte is copied), CAP to 200M.  Prints one line
# per run and a JSON summary:
#   {"disks", "disk_mib", "sequential_s", "parallel_s", "parallel_n",
#    "speedup", "cap_bytes_s", "capped_bytes_s", "cap_error_pct"}
# Scratch space comes from $TMPDIR (default /var/tmp): about 2 x 6 x DISK_MIB.
set -euo pipefail

BMIRROR=$(realpath -- "${1:-build/tools/bmirror}")
MIB=${2:-128}
CAP=${3:-200M}
PARALLEL=3
N=6

dir=$(mktemp -d "${TMPDIR:-/var/tmp}/bench-rebalance.XXXXXX")
pids=()
cleanup() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf -- "$dir"
}
trap cleanup EXIT

wait_for() {
	local i
	for ((i = 0; i < 600; i++)); do [[ -S $1 ]] && return 0; sleep 0.05; done
	echo "timed out waiting for $1" >&2
	exit 1
}

mkdir -p "$dir/seed"
for ((i = 1; i <= N; i++)); do
	head -c "${MIB}M" /dev/urandom >"$dir/seed/d$i.raw"
done

# run_once NAME ARGS...: fresh pools, serve, fio, rebalance; prints the
# summary line of --json.
run_once() {
	local name=$1 i
	shift
	rm -rf "$dir/a" "$dir/b" "$dir/c" "$dir"/*.sock
	mkdir -p "$dir/a" "$dir/b" "$dir/c"
	pids=()
	for ((i = 1; i <= N; i++)); do
		cp "$dir/seed/d$i.raw" "$dir/a/d$i.raw"
		"$BMIRROR" serve --nbd "unix:$dir/d$i.sock" --control "$dir/d$i.ctl.sock" \
			"$dir/a/d$i.raw" 2>/dev/null &
		pids+=($!)
	done
	for ((i = 1; i <= N; i++)); do
		wait_for "$dir/d$i.sock"
		wait_for "$dir/d$i.ctl.sock"
	done
	sync
	{
		printf '{"pools": [{"name": "a", "path": "%s/a", "capacity": "%dM"},' "$dir" $((N * MIB + 1))
		printf ' {"name": "b", "path": "%s/b", "capacity": "%dM"},' "$dir" $((N * MIB))
		printf ' {"name": "c", "path": "%s/c", "capacity": "%dM"}], "disks": [' "$dir" $((N * MIB))
		for ((i = 1; i <= N; i++)); do
			printf '%s{"name": "d%d", "control": "%s/d%d.ctl.sock"}' "$([[ $i == 1 ]] || echo ,)" "$i" "$dir" "$i"
		done
		printf '], "goal": {"type": "evacuate", "pool": "a"}}\n'
	} >"$dir/plan.json"
	# A light guest on every disk: 4 KiB random writes at 200 IOPS.
	local fio_pids=()
	if command -v fio >/dev/null; then
		for ((i = 1; i <= N; i++)); do
			fio --name=g --ioengine=nbd --uri="nbd+unix:///?socket=$dir/d$i.sock" \
				--rw=randwrite --bs=4k --iodepth=4 --rate_iops=200 \
				--time_based --runtime=600 --output=/dev/null >/dev/null 2>&1 &
			fio_pids+=($!)
		done
		sleep 0.5
	fi
	"$BMIRROR" rebalance "$dir/plan.json" --json "$@" >"$dir/$name.events"
	# The guests first, while their servers still answer.
	for i in "${fio_pids[@]}"; do kill "$i" 2>/dev/null || true; done
	for i in "${fio_pids[@]}"; do wait "$i" 2>/dev/null || true; done
	for i in "${pids[@]}"; do kill "$i" 2>/dev/null || true; done
	for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
	pids=()
}

# Not in $(...): the servers must stay the main shell's children, for
# the cleanup trap.
run_once sequential --max-parallel 1
run_once parallel --max-parallel "$PARALLEL"
run_once capped --max-parallel "$PARALLEL" --speed "$CAP"
seq_line=$(tail -n 1 "$dir/sequential.events")
par_line=$(tail -n 1 "$dir/parallel.events")
cap_line=$(tail -n 1 "$dir/capped.events")
printf '%-11s %s\n' sequential: "$seq_line" parallel: "$par_line" capped: "$cap_line" >&2

python3 - "$seq_line" "$par_line" "$cap_line" "$CAP" "$N" "$MIB" "$PARALLEL" <<'PY'
import json, sys
seq, par, cap = (json.loads(a) for a in sys.argv[1:4])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
c = sys.argv[4]
cap_bytes = int(c[:-1]) * units[c[-1].upper()] if c[-1].upper() in units else int(c)
for s in (seq, par, cap):
    assert s["summary"] == "done", s
rate = cap["bytes_copied"] / cap["elapsed_s"]
print(json.dumps({
    "disks": int(sys.argv[5]), "disk_mib": int(sys.argv[6]),
    "sequential_s": round(seq["elapsed_s"], 2),
    "parallel_s": round(par["elapsed_s"], 2), "parallel_n": int(sys.argv[7]),
    "speedup": round(seq["elapsed_s"] / par["elapsed_s"], 2),
    "cap_bytes_s": cap_bytes, "capped_bytes_s": round(rate),
    "cap_error_pct": round(100 * (rate - cap_bytes) / cap_bytes, 1)}))
PY
