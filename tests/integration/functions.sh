# SPDX-License-Identifier: LGPL-2.1-or-later
# shellcheck shell=bash
#
# Helpers sourced by the bmirror integration tests (tests/integration/test-*.sh).
#
# Sourcing this file:
#   - resolves the binary under test ($BMIRROR, default ../../build/tools/bmirror
#     relative to this directory) and fails if it is not executable;
#   - creates a per-test scratch directory $T under ${TMPDIR:-/tmp}, removed by an
#     EXIT trap that first unmounts anything mounted below it.
#
# Conventions: every passed check prints one "PASS: ..." line; a failed check
# prints the command, its exit status, stdout and stderr, then exits 1.
# Exit status 77 means "skipped" (meson), except when CI=true, where a skip is
# turned into a failure because CI treats skips as failures.

TEST_NAME=$(basename -- "${0%.sh}")
INTEG_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

KiB=1024
MiB=$((1024 * 1024))
# shellcheck disable=SC2034 # used by the test scripts
GiB=$((1024 * 1024 * 1024))

pass() { printf 'PASS: %s\n' "$*"; }
info() { printf '# %s\n' "$*"; }

fail() {
	printf 'FAIL: %s: %s\n' "$TEST_NAME" "$*" >&2
	exit 1
}

# Skip the whole test (exit 77), or fail when running in CI.
skip_test() {
	if [[ ${CI:-} == true ]]; then
		printf 'FAIL: %s: would skip, but CI=true (a skip counts as a failure): %s\n' "$TEST_NAME" "$*" >&2
		exit 1
	fi
	printf 'SKIP: %s: %s\n' "$TEST_NAME" "$*"
	exit 77
}

# Skip one sub-case but carry on with the rest (fails in CI).
skip_subcase() {
	if [[ ${CI:-} == true ]]; then
		fail "sub-case cannot run, and CI=true does not allow skips: $*"
	fi
	printf 'SKIP (sub-case): %s\n' "$*"
}

# requires CMD...: skip (77) if one of the commands is missing (exit 1 in CI).
requires() {
	local c missing=()
	for c in "$@"; do
		command -v -- "$c" >/dev/null 2>&1 || missing+=("$c")
	done
	if ((${#missing[@]})); then
		skip_test "required command(s) not found: ${missing[*]}"
	fi
}

# requires_root REASON: skip unless running as root.
requires_root() {
	[[ $(id -u) == 0 ]] || skip_test "needs root: $*"
}

# ---------------------------------------------------------------------------
# Binary under test
# ---------------------------------------------------------------------------
: "${BMIRROR:=$INTEG_DIR/../../build/tools/bmirror}"
if [[ ! -f $BMIRROR || ! -x $BMIRROR ]]; then
	fail "bmirror binary not found or not executable: $BMIRROR (set BMIRROR=/path/to/bmirror)"
fi
BMIRROR=$(realpath -- "$BMIRROR")

# ---------------------------------------------------------------------------
# Scratch directory and cleanup
# ---------------------------------------------------------------------------
T=$(mktemp -d "${TMPDIR:-/tmp}/bmirror-${TEST_NAME}.XXXXXX") || fail "mktemp failed"

_unmount_below() {
	local dir=$1 m
	[[ -r /proc/self/mounts ]] || return 0
	# deepest mount points first
	while IFS= read -r m; do
		[[ -n $m ]] || continue
		umount -- "$m" 2>/dev/null || umount -l -- "$m" 2>/dev/null || true
	done < <(awk -v p="$dir/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r)
}

_cleanup() {
	local rc=$?
	trap - EXIT
	# Servers and guests a failed test left running in the background.
	local pids
	pids=$(jobs -p)
	if [[ -n $pids ]]; then
		# shellcheck disable=SC2086 # one pid per word
		kill $pids 2>/dev/null || true
		wait 2>/dev/null || true
	fi
	if [[ -n ${T:-} && -d $T ]]; then
		_unmount_below "$T"
		rm -rf -- "$T"
	fi
	exit "$rc"
}
trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------
RUN_RC=0
RUN_OUT=$T/.run.out
RUN_ERR=$T/.run.err

# run CMD...: run a command, never trips set -e. Exit status in $RUN_RC,
# stdout in $RUN_OUT, stderr in $RUN_ERR.
run() {
	RUN_RC=0
	"$@" >"$RUN_OUT" 2>"$RUN_ERR" || RUN_RC=$?
}

# show_run CMD...: print the last run's command, status and output (stderr).
show_run() {
	{
		printf '  command:   %s\n' "$(printf '%q ' "$@")"
		printf '  exit code: %s\n' "$RUN_RC"
		printf '  --- stdout (first 4 KiB) ---\n'
		head -c 4096 "$RUN_OUT"
		printf '\n  --- stderr (first 4 KiB) ---\n'
		head -c 4096 "$RUN_ERR"
		printf '\n  ---\n'
	} >&2
}

# run_ok CMD...: run a command that must exit 0.
run_ok() {
	run "$@"
	if ((RUN_RC != 0)); then
		show_run "$@"
		fail "expected exit status 0, got $RUN_RC from: $(printf '%q ' "$@")"
	fi
}

# expect_fail_with [--names STR]... CODE PATTERN CMD...
#   Run CMD and check that
#   - its exit status is CODE (a number, alternatives like "1|2", or "nonzero"
#     meaning 1..125, i.e. a controlled failure and not a crash/signal);
#   - stderr is exactly one non-empty line matching the extended regex PATTERN
#     (case-insensitive);
#   - if --names is given, that line contains (one of) the given string(s),
#     either as given or as an absolute path (realpath -m).
expect_fail_with() {
	local names=() n p abs ok
	while (($# >= 2)) && [[ $1 == --names ]]; do
		names+=("$2")
		shift 2
	done
	local code=$1 pattern=$2
	shift 2
	run "$@"
	local problems=()
	if [[ $code == nonzero ]]; then
		if ((RUN_RC == 0 || RUN_RC >= 126)); then
			problems+=("expected a non-zero exit status below 126 (failure, not a crash), got $RUN_RC")
		fi
	elif [[ "|$code|" != *"|$RUN_RC|"* ]]; then
		problems+=("expected exit status $code, got $RUN_RC")
	fi
	local nlines
	nlines=$(awk 'END { print NR }' "$RUN_ERR")
	if [[ $nlines != 1 ]]; then
		problems+=("expected exactly one line on stderr, got $nlines")
	elif ! grep -q '[^[:space:]]' "$RUN_ERR"; then
		problems+=("stderr line is empty")
	elif ! grep -Eiq -- "$pattern" "$RUN_ERR"; then
		problems+=("stderr does not match /$pattern/ (case-insensitive)")
	fi
	if ((${#names[@]})); then
		ok=0
		for n in "${names[@]}"; do
			if grep -Fq -- "$n" "$RUN_ERR"; then
				ok=1
				break
			fi
			abs=$(realpath -m -- "$n" 2>/dev/null) || abs=
			if [[ -n $abs ]] && grep -Fq -- "$abs" "$RUN_ERR"; then
				ok=1
				break
			fi
		done
		((ok)) || problems+=("stderr does not name $(printf "'%s' or " "${names[@]}" | sed 's/ or $//')")
	fi
	if ((${#problems[@]})); then
		show_run "$@"
		for p in "${problems[@]}"; do
			printf '  problem:   %s\n' "$p" >&2
		done
		fail "unexpected result from: $(printf '%q ' "$@")"
	fi
}

# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

# write_at PATH OFFSET LENGTH SOURCE: write LENGTH bytes from SOURCE
# (/dev/urandom, /dev/zero, ...) at byte OFFSET, without truncating.
write_at() {
	local path=$1 off=$2 len=$3 src=$4
	head -c "$len" "$src" |
		dd of="$path" bs=1M seek="$off" oflag=seek_bytes conv=notrunc iflag=fullblock status=none
}

file_size() { stat -c '%s' -- "$1"; }

# allocated_bytes PATH: bytes allocated on disk (st_blocks * st_blksize unit).
allocated_bytes() { echo $(($(stat -c '%b*%B' -- "$1"))); }

checksum() { sha256sum -- "$1" | cut -d' ' -f1; }

# make_sparse_image PATH SIZE: a sparse file of SIZE bytes (no data at all).
make_sparse_image() {
	rm -f -- "$1"
	truncate -s "$2" -- "$1"
	# The sparseness checks need a file system with holes (ext4, xfs, btrfs,
	# tmpfs...). Without it they cannot say anything: skip (fails in CI).
	(($(allocated_bytes "$1") <= 8192)) ||
		skip_test "the file system of $(dirname -- "$1") does not keep files sparse (set TMPDIR elsewhere)"
}

# make_dense_image PATH SIZE: SIZE bytes of random data.
make_dense_image() {
	rm -f -- "$1"
	head -c "$2" /dev/urandom >"$1"
	local want
	want=$(numfmt --from=iec -- "$2")
	[[ $(file_size "$1") == "$want" ]] || fail "make_dense_image: $1 has size $(file_size "$1"), wanted $want"
}

# make_mixed_image PATH [TAIL_BYTES]
#   A 15 MiB + 1 MiB + TAIL_BYTES raw image: random 1 MiB data extents with
#   holes between them, a lone 512-byte write in a hole, data up to EOF, and
#   runs of explicitly written zero bytes inside the data regions.
#   Sets:
#     MIXED_SIZE        virtual size in bytes
#     MIXED_ZERO_RUNS   array of "OFFSET:LENGTH" 4 KiB-aligned zero runs written
#                       inside data (a sparse copy must have holes there)
#   Layout (M = MiB):
#     [0,1M) hole | [1M,2M) data | [2M,3M) hole | [3M,5M) data with zero runs
#     at 3M+256K (64K) and 4M-4K (8K, across the 1 MiB boundary) | [5M,7M) hole
#     | [7M,8M) data, first 4K zero | 512 random bytes at 10M+4K | [12M,13M)
#     data, last 8K zero | [15M, 16M+TAIL) data to EOF with a 12K zero run at
#     15M+512K and an unaligned 1000-byte zero run at 15M+100 (stays data).
make_mixed_image() {
	local path=$1 tail=${2:-0} M=$MiB K=$KiB
	MIXED_SIZE=$((16 * M + tail))
	rm -f -- "$path"
	truncate -s "$MIXED_SIZE" -- "$path"
	write_at "$path" $((1 * M)) $((1 * M)) /dev/urandom
	write_at "$path" $((3 * M)) $((2 * M)) /dev/urandom
	write_at "$path" $((7 * M)) $((1 * M)) /dev/urandom
	write_at "$path" $((10 * M + 4 * K)) 512 /dev/urandom
	write_at "$path" $((12 * M)) $((1 * M)) /dev/urandom
	write_at "$path" $((15 * M)) $((1 * M + tail)) /dev/urandom
	MIXED_ZERO_RUNS=(
		"$((3 * M + 256 * K)):$((64 * K))"
		"$((4 * M - 4 * K)):$((8 * K))"
		"$((7 * M)):$((4 * K))"
		"$((13 * M - 8 * K)):$((8 * K))"
		"$((15 * M + 512 * K)):$((12 * K))"
	)
	local r
	for r in "${MIXED_ZERO_RUNS[@]}"; do
		write_at "$path" "${r%%:*}" "${r##*:}" /dev/zero
	done
	write_at "$path" $((15 * M + 100)) 1000 /dev/zero
	sync -- "$path" 2>/dev/null || sync
	# Sanity: the zero runs must really be allocated data in the source,
	# otherwise the "zero runs become holes" checks would prove nothing.
	sparse_check_ranges "$path" data "${MIXED_ZERO_RUNS[@]}" ||
		skip_test "the file system of $(dirname -- "$path") does not allocate written zeroes (compression/dedup?); sparseness checks impossible"
	[[ $(file_size "$path") == "$MIXED_SIZE" ]] || fail "make_mixed_image: wrong size"
}

# flip_byte PATH OFFSET: replace the byte at OFFSET by its complement.
flip_byte() {
	python3 - "$1" "$2" <<'EOF'
import sys
path, off = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(off)
    b = f.read(1)
    assert len(b) == 1, "offset beyond EOF"
    f.seek(off)
    f.write(bytes([b[0] ^ 0xFF]))
EOF
}

# ---------------------------------------------------------------------------
# Allocation maps (qemu-img map) and sparseness checks
# ---------------------------------------------------------------------------

# map_json PATH OUTFILE
map_json() {
	qemu-img map -f raw --output=json "$1" >"$2" 2>&1 || {
		cat "$2" >&2
		fail "qemu-img map failed on $1"
	}
}

# data_bytes PATH: number of bytes qemu-img map reports as data.
data_bytes() {
	map_json "$1" "$T/.map.data"
	python3 -c '
import json, sys
print(sum(e["length"] for e in json.load(open(sys.argv[1])) if e["data"]))' "$T/.map.data"
}

# sparse_check_ranges PATH data|hole OFF:LEN...: all ranges are data / holes.
sparse_check_ranges() {
	local path=$1 want=$2
	shift 2
	map_json "$path" "$T/.map.ranges"
	python3 - "$T/.map.ranges" "$want" "$@" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
want = sys.argv[2]
data = [(e["start"], e["start"] + e["length"]) for e in m if e["data"]]
bad = 0
for r in sys.argv[3:]:
    off, ln = map(int, r.split(":"))
    end = off + ln
    if want == "data":
        # range must be fully covered by data extents
        pos = off
        for s, e in sorted(data):
            if s <= pos < e:
                pos = e
        if pos < end:
            print(f"  range [{off}, {end}) is not entirely data (hole at {pos})", file=sys.stderr)
            bad += 1
    else:
        ov = [(max(s, off), min(e, end)) for s, e in data if s < end and e > off]
        if ov:
            print(f"  range [{off}, {end}) should be a hole but has data at {ov}", file=sys.stderr)
            bad += 1
sys.exit(1 if bad else 0)
EOF
}

# sparse_copy_check SRC DST [OFF:LEN...]
#   - every data extent of DST lies within the data extents of SRC;
#   - every OFF:LEN range (4 KiB-aligned zero runs inside SRC data) is a hole
#     in DST;
#   - DST's allocated blocks (stat) do not exceed the data it should hold
#     (SRC data minus the zero runs, rounded to 4 KiB) plus 8 KiB of slack for
#     file system metadata (ext4 extent tree blocks are counted in st_blocks),
#     and one more 4 KiB block per 300 extents the file has (many small
#     writes in flight at once can leave a file in many extents; an ext4
#     extent block holds 340).
#   Prints the expected number of written bytes in $EXPECTED_WRITTEN.
sparse_copy_check() {
	local src=$1 dst=$2
	shift 2
	map_json "$src" "$T/.map.src"
	map_json "$dst" "$T/.map.dst"
	local out rc=0
	out=$(python3 - "$T/.map.src" "$T/.map.dst" "$@" <<'EOF'
import json, sys
src = json.load(open(sys.argv[1]))
dst = json.load(open(sys.argv[2]))
runs = [tuple(map(int, r.split(":"))) for r in sys.argv[3:]]
runs = [(o, o + l) for o, l in runs]
sdata = sorted((e["start"], e["start"] + e["length"]) for e in src if e["data"])
ddata = sorted((e["start"], e["start"] + e["length"]) for e in dst if e["data"])

def subtract(a, b):
    """intervals of a not covered by b"""
    out = []
    for s, e in a:
        cur = s
        for bs, be in b:
            if be <= cur or bs >= e:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
        if cur < e:
            out.append((cur, e))
    return out

def total(iv):
    return sum(e - s for s, e in iv)

errs = []
extra = subtract(ddata, sdata)
if extra:
    errs.append(f"destination has data where the source has holes: {extra[:10]} ({total(extra)} bytes)")
for s, e in runs:
    ov = [(max(a, s), min(b, e)) for a, b in ddata if a < e and b > s]
    if ov:
        errs.append(f"zero run [{s}, {e}) in source data is not a hole in destination: data at {ov}")
expected = total(sdata) - total([(max(a, s), min(b, e)) for a, b in sdata for s, e in runs if a < e and b > s])
print(expected)
for e in errs:
    print("  " + e, file=sys.stderr)
sys.exit(1 if errs else 0)
EOF
) || rc=$?
	if ((rc != 0)); then
		echo "  source map:" >&2
		sed 's/^/    /' "$T/.map.src" >&2
		echo "  destination map:" >&2
		sed 's/^/    /' "$T/.map.dst" >&2
		fail "sparseness of $dst does not match $src"
	fi
	EXPECTED_WRITTEN=$out
	local alloc limit extents
	alloc=$(allocated_bytes "$dst")
	extents=$(filefrag -- "$dst" 2>/dev/null | awk '{ print $(NF-2) }')
	[[ $extents =~ ^[0-9]+$ ]] || extents=0
	limit=$(((EXPECTED_WRITTEN + 4095) / 4096 * 4096 + 8192 +
		 (extents + 299) / 300 * 4096))
	if ((alloc > limit)); then
		stat -- "$src" "$dst" >&2
		fail "$dst has $alloc bytes allocated, expected at most $limit (data $EXPECTED_WRITTEN + slack): holes or zero runs were filled or preallocated"
	fi
}

# ---------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------

# json_assert FILE EXPR...: FILE must contain exactly one non-empty line holding
# one JSON object, bound to `d`; every python EXPR must be true.
json_assert() {
	local file=$1
	shift
	python3 - "$file" "$@" <<'EOF' || { show_run_file "$file"; fail "JSON check failed"; }
import json, sys
path = sys.argv[1]
text = open(path).read()
lines = [l for l in text.splitlines() if l.strip()]
if len(lines) != 1:
    print(f"  expected exactly one JSON line, got {len(lines)} non-empty lines", file=sys.stderr)
    sys.exit(1)
try:
    d = json.loads(lines[0])
except ValueError as e:
    print(f"  not valid JSON: {e}", file=sys.stderr)
    sys.exit(1)
if not isinstance(d, dict):
    print("  JSON is not an object", file=sys.stderr)
    sys.exit(1)
def isint(v):
    return isinstance(v, int) and not isinstance(v, bool)
bad = 0
for expr in sys.argv[2:]:
    try:
        ok = eval(expr, {"d": d, "isint": isint})
    except Exception as e:
        ok = False
        print(f"  check `{expr}` raised {type(e).__name__}: {e}", file=sys.stderr)
    if not ok:
        print(f"  check failed: {expr}", file=sys.stderr)
        bad += 1
sys.exit(1 if bad else 0)
EOF
}

show_run_file() {
	{
		printf '  --- JSON output (%s) ---\n' "$1"
		head -c 4096 "$1"
		printf '\n  ---\n'
	} >&2
}

# json_get FILE KEY: print one value from a one-object JSON file.
json_get() {
	python3 -c '
import json, sys
d = json.loads(open(sys.argv[1]).read())
v = d[sys.argv[2]]
print(json.dumps(v) if not isinstance(v, str) else v)' "$1" "$2"
}

# ---------------------------------------------------------------------------
# Content checks
# ---------------------------------------------------------------------------

# same_content A B [VERIFY OPTIONS...]: sizes equal, byte-identical (cmp),
# qemu-img compare and bmirror verify (with the options) say identical.
same_content() {
	local a=$1 b=$2
	shift 2
	[[ $(file_size "$a") == "$(file_size "$b")" ]] ||
		fail "size differs: $a is $(file_size "$a") bytes, $b is $(file_size "$b") bytes"
	run cmp -- "$a" "$b"
	((RUN_RC == 0)) || { show_run cmp -- "$a" "$b"; fail "$b is not byte-identical to $a"; }
	run_ok qemu-img compare -f raw -F raw "$a" "$b"
	run_ok "$BMIRROR" verify "$@" "$a" "$b"
}

# ---- serving a disk and a guest writing to it --------------------------
# wait_for_socket PATH: wait (up to 10 s) for a Unix socket to appear.
# start_serve IMAGE_OR_LINK [--link]: `bmirror serve` in the background on
#   $T/nbd.sock with control socket $T/ctl.sock (SERVE_PID; log $T/serve.err).
# stop_serve: SIGTERM it; it must exit 0.
# fio_write OUT [RATE]: fio (nbd engine) writes every 4 KiB block of the
#   served disk once with a crc32c header; fio_verify WHAT checks them all.
SERVE_PID=
SERVE_EXTRA=() # more options for start_serve (--track, ...)
wait_for_socket() {
	local i
	for ((i = 0; i < 200; i++)); do
		[[ -S $1 ]] && return 0
		sleep 0.05
	done
	fail "timed out waiting for $1"
}

start_serve() { # start_serve IMAGE_OR_LINK [--link]
	rm -f "$T/nbd.sock" "$T/ctl.sock"
	if [[ ${2:-} == --link ]]; then
		"$BMIRROR" serve --nbd "unix:$T/nbd.sock" --control "$T/ctl.sock" \
			"${SERVE_EXTRA[@]}" --link "$1" 2>"$T/serve.err" &
	else
		"$BMIRROR" serve --nbd "unix:$T/nbd.sock" --control "$T/ctl.sock" \
			"${SERVE_EXTRA[@]}" "$1" 2>"$T/serve.err" &
	fi
	SERVE_PID=$!
	wait_for_socket "$T/nbd.sock"
	wait_for_socket "$T/ctl.sock"
}

stop_serve() {
	kill -TERM "$SERVE_PID"
	local rc=0
	wait "$SERVE_PID" || rc=$?
	((rc == 0)) || { cat "$T/serve.err" >&2; fail "bmirror serve exited with $rc on SIGTERM"; }
	SERVE_PID=
}

# kill_serve_during_writes BASE OUT: qemu-io writes 4 KiB blocks of 0x44
# from byte BASE of the served disk, one process per block, so that a
# kill -9 of serve once three are acknowledged falls between some; OUT gets
# qemu-io's output ("wrote 4096/4096 bytes at offset N" per
# acknowledged block).  SERVE_PID is cleared.
kill_serve_during_writes() {
	local base=$1 out=$2 i qio_pid
	for ((i = 0; i < 200; i++)); do
		qemu-io -f raw -c "write -P 0x44 $((base + i * 4096)) 4k" \
			"nbd+unix:///?socket=$T/nbd.sock" || break
	done >"$out" 2>&1 &
	qio_pid=$!
	# Some acknowledged first, however slowly qemu-io starts here.
	for ((i = 0; i < 200; i++)); do
		(($(grep -c '^wrote 4096/4096' "$out" 2>/dev/null || true) >= 3)) && break
		kill -0 "$qio_pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -9 "$SERVE_PID"
	wait "$SERVE_PID" 2>/dev/null || true
	wait "$qio_pid" 2>/dev/null || true
	SERVE_PID=
}

# fio over the served disk: each 4 KiB block written once, with a crc32c
# header, at a limited rate so that the move happens in the middle.
FIO_COMMON=(--name=guest --ioengine=nbd --rw=randwrite --bs=4k --iodepth=16
	--size=100% --verify=crc32c --randseed=4242 --verify_state_save=0)
fio_write() { # fio_write OUT [RATE]
	fio "${FIO_COMMON[@]}" --uri="nbd+unix:///?socket=$T/nbd.sock" \
		--do_verify=0 --rate_iops="${2:-3000}" --output="$1" >/dev/null 2>&1
}
fio_verify() {
	run fio "${FIO_COMMON[@]}" --uri="nbd+unix:///?socket=$T/nbd.sock" \
		--verify_only --output="$T/fio-verify.out"
	((RUN_RC == 0)) || { cat "$T/fio-verify.out" >&2; fail "fio verify failed: $1"; }
	grep -q "err= 0" "$T/fio-verify.out" || { cat "$T/fio-verify.out" >&2; fail "fio verify reported errors: $1"; }
}

# ---- rebalancing --------------------------------------------------------
# wait_rebalance_progress EVENTS PID DISK...: until EVENTS holds a progress event
# (emitted a second into a copy) of every DISK; 60 s at most, failing if
# PID (the rebalance) ends first.
wait_rebalance_progress() {
	local ev=$1 pid=$2 end=$((SECONDS + 60))
	shift 2
	until python3 - "$ev" "$@" <<'EOF'; do
import json, sys
seen = set()
for l in open(sys.argv[1]):
    try:
        e = json.loads(l)
    except ValueError:
        continue  # a line still being written
    if e.get("event") == "progress":
        seen.add(e["disk"])
sys.exit(0 if set(sys.argv[2:]) <= seen else 1)
EOF
		kill -0 "$pid" 2>/dev/null || { cat "$ev" >&2; fail "the rebalance ended before a progress event of each of $*"; }
		((SECONDS < end)) || { cat "$ev" >&2; fail "no progress event of each of $* in 60 s"; }
		sleep 0.1
	done
}

# ---- backups of a served disk at an instant ----------------------------
# settled_copy URI COPY: copy the raw disk at URI (a guest just stopped)
#   to COPY once what the guest had in flight has landed, however slowly:
#   until two copies taken 0.3 s apart are equal (30 s at most).
settled_copy() {
	local uri=$1 copy=$2 i
	run_ok qemu-img convert -f raw -O raw "$uri" "$copy"
	for ((i = 0; i < 100; i++)); do
		sleep 0.3
		run_ok qemu-img convert -f raw -O raw "$uri" "$copy.again"
		if cmp -s -- "$copy" "$copy.again"; then
			rm -f -- "$copy.again"
			return 0
		fi
		mv -f -- "$copy.again" "$copy"
	done
	fail "$uri kept changing for 30 s with its guest stopped"
}

# backup_at_instant FIO_PID COPY OUT ARGS...: stop fio (started with
#   --thread: one process, so that SIGSTOP stops its writes), copy the
#   served disk to the raw file COPY once its writes in flight have
#   landed (settled_copy: the instant's content), then run
#   `bmirror backup --control $T/ctl.sock --json ARGS...` with its lines in
#   OUT and its stderr in OUT.err, and let fio go on as soon as the backup
#   reports SNAPSHOT_TAKEN (or ends).  BACKUP_RC is its exit status; the
#   last line of OUT is the result.
BACKUP_RC=0
backup_at_instant() {
	local fio=$1 copy=$2 out=$3 b i
	shift 3
	kill -STOP "$fio"
	settled_copy "nbd+unix:///?socket=$T/nbd.sock" "$copy"
	"$BMIRROR" backup --control "$T/ctl.sock" --json "$@" >"$out" 2>"$out.err" &
	b=$!
	for ((i = 0; i < 600; i++)); do
		grep -q '"SNAPSHOT_TAKEN"' "$out" && break
		kill -0 "$b" 2>/dev/null || break
		sleep 0.05
	done
	kill -CONT "$fio"
	BACKUP_RC=0
	wait "$b" || BACKUP_RC=$?
}

# events_in FILE: the "event" names of FILE's JSON lines, space-separated,
# consecutive BACKUP_PROGRESS lines as one.
events_in() {
	python3 - "$1" <<'PYEOF'
import json, sys
names = []
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith('{'):
        continue
    e = json.loads(line).get('event')
    if e and not (e == 'BACKUP_PROGRESS' and names and names[-1] == e):
        names.append(e)
print(' '.join(names))
PYEOF
}

# ---- replication (docs/replication.md) ---------------------------------
# These use $KEY (a PSK file) and $CTL (the primary's control socket).
# start_replica NAME ARGS...: `bmirror replica serve $T/NAME --json ARGS`
# in the background, on $LISTEN (default any port); REPLICA_PID,
# REPLICA_ADDR (its tcp:HOST:PORT).
start_replica() {
	local name=$1 i
	shift
	rm -f "$T/$name.out"
	"$BMIRROR" replica serve "$T/$name" --listen "${LISTEN:-tcp:127.0.0.1:0}" \
		--tls-psk "$KEY" --json "$@" >"$T/$name.out" 2>"$T/$name.err" &
	REPLICA_PID=$!
	for ((i = 0; i < 200; i++)); do
		grep -q '"LISTENING"' "$T/$name.out" 2>/dev/null && break
		kill -0 "$REPLICA_PID" 2>/dev/null || { cat "$T/$name.err" >&2; fail "replica $name did not start"; }
		sleep 0.05
	done
	REPLICA_ADDR=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d.get("event") == "LISTENING": print(d["address"])' "$T/$name.out")
	[[ -n $REPLICA_ADDR ]] || fail "replica $name said no address"
}

stop_replica() {
	kill -TERM "$REPLICA_PID"
	local rc=0
	wait "$REPLICA_PID" || rc=$?
	((rc == 0)) || fail "bmirror replica serve exited with $rc on SIGTERM"
}

# wait_point N: until the primary's replication has committed point >= N.
wait_point() {
	local i p
	for ((i = 0; i < 300; i++)); do
		p=$("$BMIRROR" replicate status --control "$CTL" --json |
			python3 -c 'import json,sys; print(json.load(sys.stdin)["point"])')
		((p >= $1)) && return 0
		sleep 0.1
	done
	"$BMIRROR" replicate status --control "$CTL" >&2 || true
	fail "no point $1 committed in 30 s"
}

# wait_status EXPR: until the primary's replication status (d, its JSON)
# makes the Python expression EXPR true; 30 s at most.
wait_status() {
	local i
	for ((i = 0; i < 300; i++)); do
		"$BMIRROR" replicate status --control "$CTL" --json |
			python3 -c "import json,sys; d = json.load(sys.stdin); sys.exit(0 if ($1) else 1)" &&
			return 0
		sleep 0.1
	done
	"$BMIRROR" replicate status --control "$CTL" >&2 || true
	fail "replication never came to: $1"
}

# The replica's latest point's image, and point N's.
point_image() { # point_image DIR N (0: latest)
	"$BMIRROR" replica points "$1" --json | python3 -c '
import json, sys
n = int(sys.argv[1])
ps = json.load(sys.stdin)["points"]
p = [p for p in ps if (p["latest"] if n == 0 else p["point"] == n)]
print(p[0]["image"] if p else "")' "$2"
}
