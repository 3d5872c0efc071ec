#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The qcow2 driver against QEMU as the oracle:
#   - we read what qemu-img/qemu-io write: cluster sizes 512 B..2 MiB, v2
#     and v3, zero clusters, discards, compressed clusters (zlib and zstd),
#     a backing chain of depth 3 (copy to raw, compare with qemu-img);
#   - qemu-img reads what we write: bmirror create/copy, and a random
#     writer (tests/tools/image-writer) against a model, at several cluster
#     sizes and over a backing file: qemu-img check clean, compare equal;
#   - crash safety: the writer killed with SIGKILL at random moments (50
#     times): qemu-img check reports at worst leaks (exit 0 or 3) and every
#     write acknowledged before a completed flush reads back;
#   - every corruption case of formats.md section 3.1: a clear error naming
#     the problem, never a misread; writes landing on metadata mark the
#     image corrupt; unsupported features are refused.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io python3 cmp

: "${IMAGE_WRITER:=$(dirname -- "$BMIRROR")/../tests/tools/image-writer}"
[[ -x $IMAGE_WRITER ]] || fail "image-writer not found: $IMAGE_WRITER (set IMAGE_WRITER)"
W=$IMAGE_WRITER
M=$MiB
K=$KiB

# poke FILE OFFSET STRUCTFMT VALUE: overwrite one big-endian field.
poke() {
	python3 - "$@" <<'EOF'
import struct, sys
path, off, fmt, val = sys.argv[1], int(sys.argv[2], 0), sys.argv[3], int(sys.argv[4], 0)
with open(path, "r+b") as f:
    f.seek(off)
    f.write(struct.pack(">" + fmt, val & ((1 << (8 * struct.calcsize(fmt))) - 1)))
EOF
}

# peek FILE OFFSET STRUCTFMT: print one big-endian field.
peek() {
	python3 - "$@" <<'EOF'
import struct, sys
path, off, fmt = sys.argv[1], int(sys.argv[2], 0), sys.argv[3]
with open(path, "rb") as f:
    f.seek(off)
    print(struct.unpack(">" + fmt, f.read(struct.calcsize(fmt)))[0])
EOF
}

# same_as_qemu IMG: bmirror's raw copy of IMG equals qemu-img's reading.
same_as_qemu() {
	local img=$1
	rm -f -- "$T/out.raw"
	run_ok "$BMIRROR" copy -O raw "$img" "$T/out.raw"
	run_ok qemu-img compare -q -f qcow2 -F raw "$img" "$T/out.raw"
}

# check_clean IMG [ALLOWED]: qemu-img check exit status in ALLOWED (0).
check_clean() {
	local allowed=${2:-0}
	run qemu-img check "$1"
	if [[ "|$allowed|" != *"|$RUN_RC|"* ]]; then
		show_run qemu-img check "$1"
		fail "qemu-img check $1: exit $RUN_RC"
	fi
}

# ---------------------------------------------------------------------------
info "reading what QEMU writes"
for compat in 0.10 1.1; do
	for cs in 512 4K 64K 2M; do
		img=$T/q-$compat-$cs.qcow2
		qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=$cs "$img" 24M
		zero=(-c 'write -z 5M 192k')
		[[ $compat == 0.10 ]] && zero=(-c 'write -P 0 5M 192k')
		qemu-io -f qcow2 -c 'write -P 0xa1 0 100k' -c 'write -P 0xb2 1000k 3000k' \
			-c 'write -P 0xc3 20M 513' "${zero[@]}" -c 'discard 2M 64k' \
			-c 'write -P 0xd4 23M 1M' "$img" >/dev/null
		same_as_qemu "$img"
	done
done
pass "v2 and v3 images, cluster sizes 512 B..2 MiB, zero clusters and discards read as QEMU reads them"

run_ok "$BMIRROR" info "$T/q-1.1-64K.qcow2"
grep -q 'cluster size: 65536' "$RUN_OUT" || fail "info: no cluster size"
pass "info shows the cluster size"

head -c $((3 * M)) /dev/urandom >"$T/src.raw"
head -c $((2 * M)) /dev/zero >>"$T/src.raw"
python3 -c "import sys; sys.stdout.buffer.write(bytes(range(256)) * 8192)" >>"$T/src.raw"
for ct in zlib zstd; do
	qemu-img convert -c -O qcow2 -o compression_type=$ct -f raw "$T/src.raw" "$T/c-$ct.qcow2"
	rm -f -- "$T/out.raw"
	run_ok "$BMIRROR" copy -O raw "$T/c-$ct.qcow2" "$T/out.raw"
	cmp -- "$T/src.raw" "$T/out.raw" || fail "compressed ($ct) image read wrongly"
done
pass "compressed clusters (zlib, zstd)"

# A chain of depth 3 (base <- mid <- top), with a backing format each.
qemu-img create -q -f qcow2 "$T/base.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 1 0 8M' "$T/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4K -b base.qcow2 -F qcow2 "$T/mid.qcow2"
qemu-io -f qcow2 -c 'write -P 2 1M 1M' -c 'write -z 3M 64k' "$T/mid.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$T/top.qcow2"
qemu-io -f qcow2 -c 'write -P 3 1536k 1M' -c 'write -P 4 100 1000' "$T/top.qcow2" >/dev/null
same_as_qemu "$T/top.qcow2"
pass "backing chain of depth 3"

mv "$T/mid.qcow2" "$T/mid.moved"
expect_fail_with --names mid.qcow2 nonzero 'backing' "$BMIRROR" info "$T/top.qcow2"
mv "$T/mid.moved" "$T/mid.qcow2"
pass "a missing backing file is an error naming it"

# ---------------------------------------------------------------------------
info "QEMU reading what we write"
run_ok "$BMIRROR" create -f qcow2 -o cluster_size=4K "$T/new.qcow2" 16M
check_clean "$T/new.qcow2"
[[ $(qemu-img info --output=json "$T/new.qcow2" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["cluster-size"], j["virtual-size"])') == "4096 16777216" ]] ||
	fail "create: wrong cluster or virtual size"
run_ok "$BMIRROR" create -f qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2 "$T/ov.qcow2" 8M
check_clean "$T/ov.qcow2"
run_ok qemu-img compare -q "$T/base.qcow2" "$T/ov.qcow2"
expect_fail_with nonzero 'unknown qcow2 option' "$BMIRROR" create -f qcow2 -o nonsense=1 "$T/bad1.qcow2" 1M
expect_fail_with nonzero 'cluster_size' "$BMIRROR" create -f qcow2 -o cluster_size=3000 "$T/bad2.qcow2" 1M
expect_fail_with nonzero 'compat=0.10.*not supported' "$BMIRROR" create -f qcow2 -o compat=0.10 "$T/bad3.qcow2" 1M
pass "create (cluster_size, backing_file, backing_fmt) and its refusals"

run_ok "$BMIRROR" copy -O qcow2 "$T/src.raw" "$T/fromraw.qcow2"
check_clean "$T/fromraw.qcow2"
run_ok qemu-img compare -q -f raw -F qcow2 "$T/src.raw" "$T/fromraw.qcow2"
pass "copy raw to qcow2: qemu-img check clean, compare identical"

for cs in 512 4K 64K 2M; do
	img=$T/w-$cs.qcow2
	run_ok "$W" --format qcow2 --create 32M -o cluster_size=$cs --seed 11 --ops 600 \
		--discard-pct 0 --model "$T/model.raw" "$img"
	check_clean "$img"
	run_ok qemu-img compare -q -f raw -F qcow2 "$T/model.raw" "$img"
	# With discards the model cannot say what a partly discarded cluster
	# holds; the writer's own read-back still checks the rest.
	run_ok "$W" --format qcow2 --seed 12 --ops 400 "$img"
	check_clean "$img"
done
pass "random writer against a model at 512 B..2 MiB clusters: check clean, compare identical"

qemu-img convert -O raw "$T/base.qcow2" "$T/base.raw"
for cs in 512 64K; do
	qemu-img create -q -f qcow2 -o cluster_size=$cs -b base.qcow2 -F qcow2 "$T/bov.qcow2"
	run_ok "$W" --format qcow2 --seed 13 --ops 400 --discard-pct 0 \
		--init "$T/base.raw" --model "$T/model.raw" "$T/bov.qcow2"
	check_clean "$T/bov.qcow2"
	run_ok qemu-img compare -q -f raw -F qcow2 "$T/model.raw" "$T/bov.qcow2"
done
pass "partial-cluster writes over a backing file are filled from it"

# Compressed clusters overwritten (copy-on-write out of a compressed cluster).
cp -- "$T/c-zstd.qcow2" "$T/cw.qcow2"
cp -- "$T/src.raw" "$T/cw-init.raw"
run_ok "$W" --format qcow2 --seed 14 --ops 200 --discard-pct 0 --init "$T/cw-init.raw" \
	--model "$T/model.raw" "$T/cw.qcow2"
check_clean "$T/cw.qcow2"
run_ok qemu-img compare -q -f raw -F qcow2 "$T/model.raw" "$T/cw.qcow2"
pass "writes over compressed clusters"

# ---------------------------------------------------------------------------
info "crash safety (SIGKILL at random moments)"
crash_iters=${QCOW2_CRASH_ITERATIONS:-50}
for cs in 512 65536; do
	img=$T/crash-$cs.qcow2
	run_ok "$W" --format qcow2 --create 16M -o cluster_size=$cs --ops 1 "$img"
done
for ((i = 1; i <= crash_iters; i++)); do
	cs=$((i % 2 ? 512 : 65536))
	img=$T/crash-$cs.qcow2
	rm -f -- "$T/crash.log"
	"$W" --format qcow2 --seed "$i" --ops 0 --max-len 64K --flush-every 8 \
		--log "$T/crash.log" "$img" 2>"$T/crash.err" &
	pid=$!
	sleep "0.$((RANDOM % 4))$((RANDOM % 10))"
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	if grep -q . "$T/crash.err"; then
		cat "$T/crash.err" >&2
		fail "crash iteration $i: the writer failed before it was killed"
	fi
	check_clean "$img" "0|3"
	# Killed before it opened its log: nothing to verify.
	[[ -s $T/crash.log ]] || continue
	run_ok "$W" --format qcow2 --verify-log "$T/crash.log" "$img"
done
pass "$crash_iters SIGKILLs: qemu-img check never finds corruption, flushed writes read back"

# ---------------------------------------------------------------------------
info "corruption cases (formats.md 3.1) and unsupported features"
base=$T/bad-base.qcow2
qemu-img create -q -f qcow2 -o cluster_size=64K "$base" 64M
qemu-io -f qcow2 -c 'write -P 0x55 0 64k' -c 'write -P 0x66 2M 64k' "$base" >/dev/null
# Layout: header 0, reftable 0x10000, refblock 0x20000, L1 0x30000,
# L2 0x40000, data 0x50000 (guest 0) and 0x60000 (guest 2M).
[[ $(peek "$base" 40 Q) == $((0x30000)) ]] || fail "unexpected layout of the base image"

# bad_case PATTERN OFFSET FMT VALUE...: patch a copy, bmirror info must fail.
bad_case() {
	local pattern=$1
	shift
	cp -- "$base" "$T/bad.qcow2"
	while (($#)); do
		poke "$T/bad.qcow2" "$1" "$2" "$3"
		shift 3
	done
	expect_fail_with --names "$T/bad.qcow2" nonzero "$pattern" \
		"$BMIRROR" info -f qcow2 "$T/bad.qcow2"
}

bad_case 'not a qcow2 image|qcow2' 0 I 0x12345678
bad_case 'unsupported qcow2 version 1' 4 I 1
bad_case 'unsupported qcow2 version 4' 4 I 4
bad_case 'cluster size 2\^8' 20 I 8
bad_case 'cluster size 2\^22' 20 I 22
bad_case 'header too short' 100 I 100
bad_case 'header exceeds cluster size' 100 I 0x20000
bad_case 'backing file offset' 8 Q 0x20000 16 I 4
bad_case 'backing file name too long' 8 Q 0x1000 16 I 2000
bad_case 'unsupported qcow2 feature.*incompatible bit 5' 72 Q 0x20
bad_case 'compression type' 72 Q 0x8
bad_case 'refcount_order 7 too large' 96 I 7
bad_case 'no refcount table' 56 I 0
bad_case 'L1 table offset 0x30200 invalid' 40 Q 0x30200
bad_case 'refcount table offset 0x10200 invalid' 48 Q 0x10200
bad_case 'snapshot table offset' 60 I 1 64 Q 0x1200
bad_case 'L1 table is too small' 36 I 0
bad_case 'L1 table too large' 36 I $((1 << 28))
bad_case 'header extension 0x6803f857 too large' 0x74 I 0x10000
bad_case 'snapshot table too large' 60 I 0x7fffffff
bad_case 'encrypted' 32 I 1
bad_case 'external data file' 72 Q 0x4
bad_case 'extended L2' 72 Q 0x10
bad_case 'header_length 108 is not a multiple of 8' 100 I 108
# A bitmaps extension where the feature table was: zero bitmaps / bad directory.
bad_case 'zero bitmaps' 0x70 I 0x23852875 0x74 I 24 0x78 I 0 0x88 I 0
bad_case 'bitmap directory offset' 0x70 I 0x23852875 0x74 I 24 0x78 I 1 0x88 Q 0x200 0x90 I 0
bad_case 'backing format name too long' 0x70 I 0xe2792aca 0x74 I 20
pass "header corruption: each case refused with an error naming the field"

# Cases that open (as with QEMU) and fail where the bad entry is used.
bad_io() {
	local pattern=$1
	shift
	cp -- "$base" "$T/bad.qcow2"
	while (($#)); do
		poke "$T/bad.qcow2" "$1" "$2" "$3"
		shift 3
	done
	rm -f -- "$T/out.raw"
	expect_fail_with --names "$T/bad.qcow2" nonzero "$pattern" \
		"$BMIRROR" copy -O raw "$T/bad.qcow2" "$T/out.raw"
}
bad_io 'L2 table offset 0x40200 unaligned' 0x30000 Q $((0x40200 | 1 << 63))
bad_io 'data cluster offset 0x50200 unaligned' 0x40000 Q $((0x50200 | 1 << 63))
bad_io 'does not decompress' 0x40000 Q $((0x50000 | 1 << 62))
pass "bad L1/L2 entries fail the read that uses them"

# L1 table past EOF: QEMU reads zeroes; so do we.
cp -- "$base" "$T/bad.qcow2"
poke "$T/bad.qcow2" 40 Q 0x10000000
rm -f -- "$T/out.raw"
run_ok "$BMIRROR" copy -O raw "$T/bad.qcow2" "$T/out.raw"
cmp -n $((64 * M)) -- "$T/out.raw" /dev/zero || fail "L1 past EOF should read as zeroes"
pass "L1 table past the end of the file reads as zeroes (as QEMU)"

# An L2 entry pointing at the L1 table: a write there marks the image corrupt.
cp -- "$base" "$T/bad.qcow2"
python3 - "$T/bad.qcow2" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(0x40000)
    f.write(struct.pack(">Q", 0x30000 | 1 << 63) * 1024)
EOF
expect_fail_with nonzero 'corrupt.*metadata.*L1' "$W" --format qcow2 --ops 50 --max-len 4K \
	--align 4K --discard-pct 0 --seed 1 "$T/bad.qcow2"
[[ $(($(peek "$T/bad.qcow2" 72 Q) & 2)) == 2 ]] || fail "corrupt bit not set"
run_ok "$BMIRROR" info "$T/bad.qcow2"
expect_fail_with nonzero 'marked corrupt' "$W" --format qcow2 --ops 1 "$T/bad.qcow2"
pass "a write landing on metadata marks the image corrupt; it then opens read-only only"

# Dirty bit: read-only fine, read-write refused.
cp -- "$base" "$T/bad.qcow2"
poke "$T/bad.qcow2" 72 Q 1
same_as_qemu "$T/bad.qcow2"
expect_fail_with nonzero 'not closed cleanly.*qemu-img check -r all' "$W" --format qcow2 --ops 1 "$T/bad.qcow2"
pass "dirty image: read-only open works, read-write refused"

# Autoclear bits (bit 0 with no tracker keeping the bitmaps) are cleared
# before the first write of a read-write open.
cp -- "$base" "$T/bad.qcow2"
poke "$T/bad.qcow2" 88 Q 0x8001
run_ok "$W" --format qcow2 --ops 5 "$T/bad.qcow2"
[[ $(peek "$T/bad.qcow2" 88 Q) == 0 ]] || fail "autoclear bits not cleared"
check_clean "$T/bad.qcow2"
pass "autoclear bits cleared before the first write"

# Version 2 and internal snapshots: read-only.
expect_fail_with nonzero 'version 2.*read-only' "$W" --format qcow2 --ops 1 "$T/q-0.10-64K.qcow2"
cp -- "$base" "$T/snap.qcow2"
qemu-img snapshot -c s1 "$T/snap.qcow2"
same_as_qemu "$T/snap.qcow2"
expect_fail_with nonzero 'internal snapshot' "$W" --format qcow2 --ops 1 "$T/snap.qcow2"
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128K "$T/x.qcow2" 1M
expect_fail_with nonzero 'extended L2' "$BMIRROR" info "$T/x.qcow2"
pass "v2 and snapshot images are read-only; extended L2 refused"

# A v2 image with a zero-flag L2 entry.
qemu-img create -q -f qcow2 -o compat=0.10 "$T/v2z.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 1 0 64k' "$T/v2z.qcow2" >/dev/null
l2=$(($(peek "$T/v2z.qcow2" $(($(peek "$T/v2z.qcow2" 40 Q))) Q) & 0xfffffffffe00))
poke "$T/v2z.qcow2" "$l2" Q 1
rm -f -- "$T/out.raw"
expect_fail_with nonzero 'zero cluster entry in a version 2' "$BMIRROR" copy -O raw "$T/v2z.qcow2" "$T/out.raw"
pass "zero flag in a v2 image is corruption"
