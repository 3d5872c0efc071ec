#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Integration test for `bmirror verify`:
#   - identical images (also sparse vs fully allocated, holes vs written
#     zeroes, 0-byte, 1-byte) exit 0, JSON says identical;
#   - one byte changed at offsets 0, 4095, 4096, 1 MiB - 1, 1 MiB, inside a zero
#     run, and at the very last byte exits 1 and reports exactly that first
#     offset (text: as a decimal number; JSON: first_difference), in both
#     argument orders, for a dense and for a sparse/mixed image;
#   - with several differences the first one is reported;
#   - different sizes exit 1; a missing file exits 2 with one stderr line.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires python3 cmp truncate numfmt dd head stat awk

# verify_identical A B [OPTIONS...]
verify_identical() {
	local a=$1 b=$2
	shift 2
	run_ok "$BMIRROR" verify "$@" "$a" "$b"
	run_ok "$BMIRROR" verify --json "$@" "$a" "$b"
	cp -- "$RUN_OUT" "$T/v.json"
	json_assert "$T/v.json" "d['identical'] is True" "d.get('first_difference') in (None, -1)"
}

# verify_differs A B OFFSET: exit 1, OFFSET reported in text and JSON.
verify_differs() {
	local a=$1 b=$2 off=$3
	run "$BMIRROR" verify "$a" "$b"
	if ((RUN_RC != 1)); then
		show_run "$BMIRROR" verify "$a" "$b"
		fail "verify: expected exit 1 for images differing at $off, got $RUN_RC"
	fi
	if ! grep -oE '[0-9]+' "$RUN_OUT" | grep -qx -- "$off"; then
		show_run "$BMIRROR" verify "$a" "$b"
		fail "verify: stdout does not mention the first differing offset $off as a decimal number"
	fi
	run "$BMIRROR" verify --json "$a" "$b"
	if ((RUN_RC != 1)); then
		show_run "$BMIRROR" verify --json "$a" "$b"
		fail "verify --json: expected exit 1 for images differing at $off, got $RUN_RC"
	fi
	cp -- "$RUN_OUT" "$T/v.json"
	json_assert "$T/v.json" "d['identical'] is False" "isint(d['first_difference']) and d['first_difference'] == $off"
}

# verify_size_differs A B: exit 1 (text and JSON)
verify_size_differs() {
	local a=$1 b=$2
	run "$BMIRROR" verify "$a" "$b"
	((RUN_RC == 1)) || { show_run "$BMIRROR" verify "$a" "$b"; fail "verify: expected exit 1 for different sizes, got $RUN_RC"; }
	run "$BMIRROR" verify --json "$a" "$b"
	((RUN_RC == 1)) || { show_run "$BMIRROR" verify --json "$a" "$b"; fail "verify --json: expected exit 1 for different sizes, got $RUN_RC"; }
	cp -- "$RUN_OUT" "$T/v.json"
	json_assert "$T/v.json" "d['identical'] is False"
}

make_dense_image "$T/dense.img" $((8 * MiB + 1000))
make_mixed_image "$T/mixed.img" 1000
DENSE_SIZE=$(file_size "$T/dense.img")

# ---------------------------------------------------------------------------
# identical
verify_identical "$T/dense.img" "$T/dense.img"
pass "verify: an image against itself: identical (exit 0)"
cp --sparse=always -- "$T/mixed.img" "$T/mixed.copy"
verify_identical "$T/mixed.img" "$T/mixed.copy"
verify_identical "$T/mixed.img" "$T/mixed.copy" -f raw -F raw
pass "verify: mixed image and a copy: identical (also with -f raw -F raw)"

cp --sparse=never -- "$T/mixed.img" "$T/mixed.full"
(($(allocated_bytes "$T/mixed.full") >= $(file_size "$T/mixed.img"))) || fail "could not make a fully allocated copy"
verify_identical "$T/mixed.img" "$T/mixed.full"
verify_identical "$T/mixed.full" "$T/mixed.img"
pass "verify: sparse image vs the same data fully allocated: identical"

make_sparse_image "$T/sparse.img" 32M
head -c 32M /dev/zero >"$T/zeroes.img"
verify_identical "$T/sparse.img" "$T/zeroes.img"
pass "verify: 32 MiB hole vs 32 MiB of written zeroes: identical"

: >"$T/empty1.img"
: >"$T/empty2.img"
verify_identical "$T/empty1.img" "$T/empty2.img"
printf 'x' >"$T/one1.img"
printf 'x' >"$T/one2.img"
verify_identical "$T/one1.img" "$T/one2.img"
pass "verify: 0-byte and 1-byte images: identical"

# ---------------------------------------------------------------------------
# one byte changed
check_flip() {
	local base=$1 off=$2 mod=$T/mod.img
	rm -f -- "$mod"
	cp --sparse=always -- "$base" "$mod"
	flip_byte "$mod" "$off"
	cmp -s -- "$base" "$mod" && fail "self-test: flip_byte did not change $mod"
	verify_differs "$base" "$mod" "$off"
	verify_differs "$mod" "$base" "$off"
	pass "verify: $(basename -- "$base") with byte $off changed: exit 1, offset $off reported (text, JSON, both orders)"
}
for off in 0 4095 4096 $((MiB - 1)) $((MiB)) $((5 * MiB + 12345)) $((DENSE_SIZE - 1)); do
	check_flip "$T/dense.img" "$off"
done
for off in 0 4095 4096 $((MiB - 1)) $((MiB)) $((3 * MiB + 256 * KiB + 4097)) $((10 * MiB + 4096 + 511)) \
	$((10 * MiB + 4096 + 512)) $((MIXED_SIZE - 1)); do
	check_flip "$T/mixed.img" "$off"
done

# Several differences: the first one is reported.
cp -- "$T/dense.img" "$T/multi.img"
flip_byte "$T/multi.img" $((6 * MiB + 7))
flip_byte "$T/multi.img" $((2 * MiB + 4097))
flip_byte "$T/multi.img" $((DENSE_SIZE - 1))
verify_differs "$T/dense.img" "$T/multi.img" $((2 * MiB + 4097))
pass "verify: three differences: the first ($((2 * MiB + 4097))) is reported"

# A hole in one image vs data in the other.
cp --sparse=always -- "$T/mixed.img" "$T/hole-data.img"
write_at "$T/hole-data.img" $((9 * MiB)) 4096 /dev/urandom
printf '\x01' | dd of="$T/hole-data.img" bs=1 seek=$((9 * MiB)) conv=notrunc status=none
verify_differs "$T/mixed.img" "$T/hole-data.img" $((9 * MiB))
verify_differs "$T/hole-data.img" "$T/mixed.img" $((9 * MiB))
pass "verify: hole vs data block: first difference $((9 * MiB))"

# ---------------------------------------------------------------------------
# different sizes
head -c $((DENSE_SIZE - 1)) -- "$T/dense.img" >"$T/shorter.img"
verify_size_differs "$T/dense.img" "$T/shorter.img"
verify_size_differs "$T/shorter.img" "$T/dense.img"
pass "verify: image vs the same image one byte shorter: exit 1 (both orders)"
cp -- "$T/dense.img" "$T/longer.img"
truncate -s +4096 -- "$T/longer.img"
verify_size_differs "$T/dense.img" "$T/longer.img"
verify_size_differs "$T/longer.img" "$T/dense.img"
pass "verify: image vs the same image plus 4096 zero bytes: exit 1 (both orders)"
make_sparse_image "$T/sparse16.img" 16M
verify_size_differs "$T/sparse.img" "$T/sparse16.img"
verify_size_differs "$T/empty1.img" "$T/one1.img"
pass "verify: all-zero images of different sizes, 0 vs 1 byte: exit 1"

# ---------------------------------------------------------------------------
# errors
expect_fail_with --names "$T/missing.img" 2 '.' "$BMIRROR" verify "$T/missing.img" "$T/dense.img"
expect_fail_with --names "$T/missing.img" 2 '.' "$BMIRROR" verify "$T/dense.img" "$T/missing.img"
expect_fail_with --names "$T/missing.img" 2 '.' "$BMIRROR" verify --json "$T/dense.img" "$T/missing.img"
pass "verify with a missing file (either side, also --json): exit 2, one stderr line naming it"

info "all verify checks passed"
