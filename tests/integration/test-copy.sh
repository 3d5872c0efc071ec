#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Integration test for `bmirror copy` on raw images:
#   - sparse, dense, 0-byte, 1025 KiB, 1 MiB + 1 byte and mixed (data / holes /
#     explicit zero runs) images are copied byte-exactly (cmp, qemu-img compare,
#     bmirror verify);
#   - holes stay holes and 4 KiB-aligned zero runs become holes (qemu-img map,
#     stat block counts), unless --allocate, which fully allocates the copy;
#   - --json prints one parseable line with consistent byte counts;
#   - --overwrite replaces an existing destination (no stale data left in its
#     holes), without it an existing destination is refused and untouched;
#   - -f raw / -O raw, --direct, --progress, --request-size / --requests;
#   - format probing: a qcow2 / VHDX magic at offset 0 is refused without -f
#     and copied byte-exactly with -f raw.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img python3 cmp sha256sum truncate numfmt dd head stat awk

ZR=() # zero runs expected to become holes for the next check_copy

# check_copy LABEL SRC [COPY OPTIONS...]
#   copy SRC with --json plus options, then check content, sparseness and the
#   JSON summary. Leaves the copy in $T/LABEL.copy.
check_copy() {
	local label=$1 src=$2
	shift 2
	local dst=$T/$label.copy json=$T/$label.json size
	rm -f -- "$dst"
	size=$(file_size "$src")
	run_ok "$BMIRROR" copy --json "$@" "$src" "$dst"
	cp -- "$RUN_OUT" "$json"
	same_content "$src" "$dst"
	sparse_copy_check "$src" "$dst" "${ZR[@]+"${ZR[@]}"}"
	json_assert "$json" \
		'all(k in d for k in ("bytes_read", "bytes_written", "bytes_copied", "bytes_zeroed", "virtual_size", "elapsed_s"))' \
		'all(isint(d[k]) and d[k] >= 0 for k in ("bytes_read", "bytes_written", "bytes_copied", "bytes_zeroed", "virtual_size"))' \
		'isinstance(d["elapsed_s"], (int, float)) and not isinstance(d["elapsed_s"], bool) and d["elapsed_s"] >= 0' \
		"d['virtual_size'] == $size" \
		"d['bytes_read'] >= d['bytes_written']" \
		"d['bytes_written'] == $EXPECTED_WRITTEN" \
		"d['bytes_read'] <= $size" \
		"d['bytes_copied'] >= d['bytes_written']" \
		"d['bytes_copied'] <= $size" \
		"d['bytes_written'] + d['bytes_zeroed'] <= $size"
	pass "copy $label${*:+ ($*)}: identical, sparseness kept, JSON counts consistent (written=$EXPECTED_WRITTEN of $size)"
}

# check_allocated LABEL SRC [COPY OPTIONS...]: copy --allocate => fully allocated.
check_allocated() {
	local label=$1 src=$2
	shift 2
	local dst=$T/$label.copy size alloc
	rm -f -- "$dst"
	size=$(file_size "$src")
	run_ok "$BMIRROR" copy --allocate "$@" "$src" "$dst"
	same_content "$src" "$dst"
	alloc=$(allocated_bytes "$dst")
	((alloc >= size)) || {
		stat -- "$dst" >&2
		fail "copy --allocate $label: only $alloc of $size bytes allocated"
	}
	pass "copy --allocate $label${*:+ ($*)}: identical and fully allocated ($alloc >= $size bytes)"
}

# ---------------------------------------------------------------------------
info "creating test images in $T"
make_sparse_image "$T/sparse64M.img" 64M
make_sparse_image "$T/sparse1M+1.img" $((MiB + 1))
make_dense_image "$T/dense8M.img" 8M
make_dense_image "$T/dense1025K.img" 1025K
make_dense_image "$T/dense1M+1.img" $((MiB + 1))
make_dense_image "$T/dense1.img" 1
: >"$T/empty.img"
make_mixed_image "$T/mixed.img"
MIXED_RUNS=("${MIXED_ZERO_RUNS[@]}")
make_mixed_image "$T/mixed-tail.img" 1000
MIXED_TAIL_RUNS=("${MIXED_ZERO_RUNS[@]}")

# Make sure the sparseness checker itself can fail: a fully allocated copy of
# the mixed image must be rejected by sparse_copy_check.
cp --sparse=never -- "$T/mixed.img" "$T/mixed.filled"
if (sparse_copy_check "$T/mixed.img" "$T/mixed.filled" "${MIXED_RUNS[@]}") 2>/dev/null; then
	fail "self-test: sparse_copy_check accepted a fully allocated copy"
fi
rm -f -- "$T/mixed.filled"
pass "self-test: sparseness checker rejects a filled copy"

# ---------------------------------------------------------------------------
# Plain copies
ZR=()
check_copy sparse64M "$T/sparse64M.img"
check_copy sparse1M+1 "$T/sparse1M+1.img"
check_copy dense8M "$T/dense8M.img"
check_copy dense1025K "$T/dense1025K.img"
check_copy dense1M+1 "$T/dense1M+1.img"
check_copy dense1 "$T/dense1.img"
check_copy empty "$T/empty.img"
ZR=("${MIXED_RUNS[@]}")
check_copy mixed "$T/mixed.img"
ZR=("${MIXED_TAIL_RUNS[@]}")
check_copy mixed-tail "$T/mixed-tail.img"

# Request size / queue depth variations
ZR=("${MIXED_RUNS[@]}")
check_copy mixed-rs64K-q1 "$T/mixed.img" --request-size 64K --requests 1
check_copy mixed-rs4096-q64 "$T/mixed.img" --request-size 4096 --requests 64
ZR=("${MIXED_TAIL_RUNS[@]}")
check_copy mixed-tail-rs4M-q8 "$T/mixed-tail.img" --request-size 4M --requests 8
ZR=()
check_copy dense1M+1-rs4096 "$T/dense1M+1.img" --request-size 4096 --requests 2

# --speed: 8 MiB of data at 4 MiB/s takes about 2 s (the limiter allows
# no burst at the start), and the copy is still exact.
ZR=()
check_copy dense8M-speed "$T/dense8M.img" --speed 4M
json_assert "$T/dense8M-speed.json" "d['elapsed_s'] >= 1.5"
pass "copy --speed 4M of 8 MiB took at least 1.5 s"

# Explicit formats
ZR=("${MIXED_RUNS[@]}")
check_copy mixed-fO "$T/mixed.img" -f raw -O raw
check_copy mixed-O "$T/mixed.img" -O raw

# --direct (size multiple of 4096)
ZR=()
check_copy dense8M-direct "$T/dense8M.img" --direct
ZR=("${MIXED_RUNS[@]}")
check_copy mixed-direct "$T/mixed.img" --direct

# --progress (no JSON): result must still be right
rm -f -- "$T/progress.copy"
run_ok "$BMIRROR" copy --progress "$T/mixed.img" "$T/progress.copy"
same_content "$T/mixed.img" "$T/progress.copy"
sparse_copy_check "$T/mixed.img" "$T/progress.copy" "${MIXED_RUNS[@]}"
rm -f -- "$T/progress.copy"
pass "copy --progress: identical, sparseness kept"

# Plain copy without any option
rm -f -- "$T/plain.copy"
run_ok "$BMIRROR" copy "$T/mixed-tail.img" "$T/plain.copy"
same_content "$T/mixed-tail.img" "$T/plain.copy"
sparse_copy_check "$T/mixed-tail.img" "$T/plain.copy" "${MIXED_TAIL_RUNS[@]}"
rm -f -- "$T/plain.copy"
pass "copy without options: identical, sparseness kept"

# ---------------------------------------------------------------------------
# --allocate
check_allocated sparse1M+1-alloc "$T/sparse1M+1.img"
check_allocated mixed-alloc "$T/mixed.img"
check_allocated mixed-tail-alloc "$T/mixed-tail.img"
check_allocated dense1025K-alloc "$T/dense1025K.img"
rm -f -- "$T/alloc-json.copy"
run_ok "$BMIRROR" copy --allocate --json "$T/mixed.img" "$T/alloc-json.copy"
cp -- "$RUN_OUT" "$T/alloc.json"
json_assert "$T/alloc.json" \
	"d['virtual_size'] == $(file_size "$T/mixed.img")" \
	"d['bytes_read'] >= d['bytes_written']" \
	"d['bytes_read'] <= $(file_size "$T/mixed.img")"
same_content "$T/mixed.img" "$T/alloc-json.copy"
pass "copy --allocate --json: one JSON line, consistent counts"

# ---------------------------------------------------------------------------
# Existing destination: refused without --overwrite, replaced with it.
make_dense_image "$T/existing.img" 24M
sum_before=$(checksum "$T/existing.img")
expect_fail_with --names "$T/existing.img" 1 '.' \
	"$BMIRROR" copy "$T/mixed.img" "$T/existing.img"
[[ $(checksum "$T/existing.img") == "$sum_before" && $(file_size "$T/existing.img") == $((24 * MiB)) ]] ||
	fail "copy without --overwrite modified the existing destination"
pass "copy onto an existing file without --overwrite: refused (exit 1), destination untouched"

: >"$T/existing-empty.img"
expect_fail_with --names "$T/existing-empty.img" 1 '.' \
	"$BMIRROR" copy "$T/dense1025K.img" "$T/existing-empty.img"
[[ $(file_size "$T/existing-empty.img") == 0 ]] || fail "existing empty destination was modified"
pass "copy onto an existing empty file without --overwrite: refused (exit 1)"

run_ok "$BMIRROR" copy --overwrite "$T/mixed.img" "$T/existing.img"
same_content "$T/mixed.img" "$T/existing.img"
sparse_copy_check "$T/mixed.img" "$T/existing.img" "${MIXED_RUNS[@]}"
pass "copy --overwrite onto a larger dense file: identical, truncated, no stale data in holes"

make_dense_image "$T/existing-small.img" 1M
run_ok "$BMIRROR" copy --overwrite --json "$T/mixed-tail.img" "$T/existing-small.img"
same_content "$T/mixed-tail.img" "$T/existing-small.img"
sparse_copy_check "$T/mixed-tail.img" "$T/existing-small.img" "${MIXED_TAIL_RUNS[@]}"
pass "copy --overwrite onto a smaller dense file: identical, sparseness kept"

rm -f -- "$T/new-overwrite.copy"
run_ok "$BMIRROR" copy --overwrite "$T/dense1025K.img" "$T/new-overwrite.copy"
same_content "$T/dense1025K.img" "$T/new-overwrite.copy"
pass "copy --overwrite to a new (non-existing) destination works"

# ---------------------------------------------------------------------------
# Format probing
mkdir -p -- "$T/probe"
make_dense_image "$T/probe/qcow2magic.img" 1M
printf 'QFI\xfb' | dd of="$T/probe/qcow2magic.img" conv=notrunc status=none
make_dense_image "$T/probe/vhdxmagic.img" 1M
printf 'vhdxfile' | dd of="$T/probe/vhdxmagic.img" conv=notrunc status=none
for m in qcow2magic vhdxmagic; do
	src=$T/probe/$m.img
	dst=$T/probe/$m.copy
	sum_before=$(checksum "$src")
	listing_before=$(ls -A -- "$T/probe")
	run "$BMIRROR" copy "$src" "$dst"
	if ((RUN_RC == 0 || RUN_RC >= 126)); then
		show_run "$BMIRROR" copy "$src" "$dst"
		fail "a file starting with the $m was copied (as raw?) without -f, or crashed"
	fi
	[[ ! -e $dst ]] || fail "failed copy of $src left $dst behind"
	[[ $(ls -A -- "$T/probe") == "$listing_before" ]] || fail "failed copy left files behind in $T/probe"
	[[ $(checksum "$src") == "$sum_before" ]] || fail "source $src modified"
	pass "copy of a file with $m at offset 0 without -f: refused (exit $RUN_RC), nothing left behind"

	run_ok "$BMIRROR" copy -f raw "$src" "$dst"
	same_content "$src" "$dst" -f raw -F raw
	pass "copy -f raw of a file with $m at offset 0: byte-exact"
done

# The magic elsewhere than offset 0, or a file too short to hold it, is raw.
make_dense_image "$T/probe/magic-at-512.img" 64K
printf 'QFI\xfb' | dd of="$T/probe/magic-at-512.img" bs=1 seek=512 conv=notrunc status=none
run_ok "$BMIRROR" copy "$T/probe/magic-at-512.img" "$T/probe/magic-at-512.copy"
same_content "$T/probe/magic-at-512.img" "$T/probe/magic-at-512.copy"
pass "copy of a file with a qcow2 magic at offset 512 (not 0) without -f: copied as raw"
printf 'QFI' >"$T/probe/short.img"
run_ok "$BMIRROR" copy "$T/probe/short.img" "$T/probe/short.copy"
same_content "$T/probe/short.img" "$T/probe/short.copy"
pass "copy of a 3-byte file 'QFI' without -f: copied as raw"

info "all copy checks passed"
