#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Integration test for `bmirror create` and `bmirror info`:
#   - create -f raw with sizes in every accepted spelling (plain bytes, K/M/G/T,
#     lower-case k/m/g, trailing B / iB) gives a sparse file of exactly that
#     size that reads as zeroes;
#   - bad size strings are usage errors (exit 2, one stderr line) and create
#     nothing;
#   - create refuses an existing image unless --overwrite, and leaves it intact;
#   - info (text and --json) agrees with stat(1) and `qemu-img info`;
#   - qcow2 / VHDX images (from qemu-img create) and files starting with their
#     magic are never reported as raw without -f.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img python3 cmp sha256sum truncate numfmt dd head stat awk

# ---------------------------------------------------------------------------
# create: accepted sizes
declare -A SIZES=(
	[4096]=4096
	[1]=1
	[1025K]=1049600
	[1025k]=1049600
	[512M]=536870912
	[512m]=536870912
	[10G]=10737418240
	[3g]=3221225472
	[1T]=1099511627776
	[1KiB]=1024
	[1MiB]=1048576
	[2GiB]=2147483648
	[4KB]=4096
	[7MB]=7340032
	[1kB]=1024
	[2mB]=2097152
)
for spec in "${!SIZES[@]}"; do
	want=${SIZES[$spec]}
	img=$T/create-$spec.img
	run "$BMIRROR" create -f raw "$img" "$spec"
	if ((RUN_RC != 0)) && ((want > 16 * GiB)) && grep -qi 'too large' "$RUN_ERR"; then
		skip_subcase "create $spec: the file system of $T has a smaller maximum file size"
		rm -f -- "$img"
		continue
	fi
	if ((RUN_RC != 0)); then
		show_run "$BMIRROR" create -f raw "$img" "$spec"
		fail "create -f raw IMAGE $spec failed"
	fi
	[[ -f $img ]] || fail "create -f raw $img $spec: no file created"
	got=$(file_size "$img")
	((got == want)) || fail "create $spec: size $got, expected $want"
	alloc=$(allocated_bytes "$img")
	((alloc <= 8192)) || fail "create $spec: image is not sparse ($alloc bytes allocated)"
	qsize=$(qemu-img info -f raw --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
	# (qemu-img rounds raw sizes up to a multiple of 512)
	((qsize == (want + 511) / 512 * 512)) || fail "create $spec: qemu-img info says virtual-size $qsize, expected $want"
	# reads as zeroes (first and last MiB; the whole thing if small)
	n=$((want < 2 * MiB ? want : MiB))
	cmp -s -n "$n" -- "$img" /dev/zero || fail "create $spec: first $n bytes are not zero"
	if ((want > n)); then
		tail -c "$n" -- "$img" | cmp -s -n "$n" - /dev/zero || fail "create $spec: last $n bytes are not zero"
	fi
	rm -f -- "$img"
	pass "create -f raw IMAGE $spec: size $want, sparse ($alloc bytes allocated), reads as zeroes"
done

# ---------------------------------------------------------------------------
# create: bad sizes are usage errors and create nothing
for spec in abc -1 10X '' 99999999999999999999 18014398509481984K 1GG G 12Q 0x '1 G'; do
	img=$T/bad-size.img
	rm -f -- "$img"
	names=(--names "$img")
	if [[ -z $spec ]]; then
		names+=(--names size)
	elif [[ $spec == -1 ]]; then
		names+=(--names "$spec" --names "'1'") # may be parsed as option -1
	else
		names+=(--names "$spec")
	fi
	expect_fail_with "${names[@]}" 2 '.' "$BMIRROR" create -f raw "$img" "$spec"
	[[ ! -e $img ]] || fail "create with bad size '$spec' left $img behind"
	pass "create with bad size '$spec': usage error (exit 2), one stderr line, nothing created"
done

# 1.5G: either a usage error, or exactly 1.5 GiB.
img=$T/onepointfive.img
rm -f -- "$img"
run "$BMIRROR" create -f raw "$img" 1.5G
if ((RUN_RC == 0)); then
	[[ $(file_size "$img") == 1610612736 ]] ||
		fail "create 1.5G accepted but size is $(file_size "$img"), expected 1610612736"
	pass "create 1.5G: accepted, size 1610612736"
else
	expect_fail_with --names "$img" --names 1.5G 2 '.' "$BMIRROR" create -f raw "$img" 1.5G
	[[ ! -e $img ]] || fail "create with bad size '1.5G' left $img behind"
	pass "create 1.5G: fractional sizes rejected as a usage error (exit 2)"
fi
rm -f -- "$img"

# ---------------------------------------------------------------------------
# create: existing image
img=$T/existing.img
make_dense_image "$img" 1M
sum=$(checksum "$img")
expect_fail_with --names "$img" 1 '.' "$BMIRROR" create -f raw "$img" 4M
[[ $(checksum "$img") == "$sum" && $(file_size "$img") == "$MiB" ]] || fail "create without --overwrite modified $img"
pass "create on an existing image without --overwrite: refused (exit 1), image untouched"

run_ok "$BMIRROR" create -f raw --overwrite "$img" 4M
[[ $(file_size "$img") == $((4 * MiB)) ]] || fail "create --overwrite: size $(file_size "$img"), expected $((4 * MiB))"
cmp -s -n $((4 * MiB)) -- "$img" /dev/zero || fail "create --overwrite: old data still readable in $img"
alloc=$(allocated_bytes "$img")
((alloc <= 8192)) || fail "create --overwrite: not sparse ($alloc bytes allocated)"
pass "create --overwrite on an existing dense image: new size, all zeroes, sparse"

run_ok "$BMIRROR" create --overwrite -f raw "$img" 1K
[[ $(file_size "$img") == 1024 ]] || fail "create --overwrite (shrink): size $(file_size "$img"), expected 1024"
pass "create --overwrite shrinking an image: size 1024"

# ---------------------------------------------------------------------------
# info on raw images: text and JSON vs stat and qemu-img info
make_sparse_image "$T/sparse.img" 10G
make_dense_image "$T/dense.img" 8M
make_dense_image "$T/odd.img" $((MiB + 1))
make_mixed_image "$T/mixed.img" 1000
: >"$T/empty.img"

check_info() {
	local img=$1
	shift
	local size alloc q_size q_alloc vs
	size=$(file_size "$img")
	alloc=$(allocated_bytes "$img")
	qemu-img info -f raw --output=json "$img" >"$T/qinfo.json"
	q_size=$(json_get "$T/qinfo.json" virtual-size)
	q_alloc=$(json_get "$T/qinfo.json" actual-size)
	((q_size == (size + 511) / 512 * 512)) || fail "qemu-img info disagrees with stat on $img ($q_size vs $size)"

	run_ok "$BMIRROR" info "$@" "$img"
	grep -Eq '^[[:space:]]*format: raw[[:space:]]*$' "$RUN_OUT" ||
		{ show_run "$BMIRROR" info "$@" "$img"; fail "info $img: no 'format: raw' line"; }
	vs=$(sed -nE 's/^[[:space:]]*virtual size: ([0-9]+)([^0-9].*)?$/\1/p' "$RUN_OUT" | head -n1)
	[[ -n $vs ]] || { show_run "$BMIRROR" info "$@" "$img"; fail "info $img: no 'virtual size: <bytes>' line"; }
	((vs == size)) || { show_run "$BMIRROR" info "$@" "$img"; fail "info $img: virtual size $vs, expected $size"; }
	pass "info ${*:+$* }$(basename -- "$img"): 'format: raw', 'virtual size: $size'"

	run_ok "$BMIRROR" info --json "$@" "$img"
	cp -- "$RUN_OUT" "$T/info.json"
	json_assert "$T/info.json" \
		'all(k in d for k in ("filename", "format", "virtual-size", "allocated-bytes", "cluster-size"))' \
		"d['format'] == 'raw'" \
		"isint(d['virtual-size']) and d['virtual-size'] == $size" \
		"isint(d['allocated-bytes']) and d['allocated-bytes'] == $alloc" \
		"d['allocated-bytes'] == $q_alloc" \
		"d['cluster-size'] is None or (isint(d['cluster-size']) and d['cluster-size'] >= 0)" \
		"d['filename'] in ('$img', '$(realpath -- "$img")')"
	pass "info --json ${*:+$* }$(basename -- "$img"): virtual-size $size, allocated-bytes $alloc (= stat = qemu-img actual-size)"
}
check_info "$T/sparse.img"
check_info "$T/dense.img"
check_info "$T/odd.img"
check_info "$T/mixed.img"
check_info "$T/empty.img"
check_info "$T/dense.img" -f raw

# ---------------------------------------------------------------------------
# info must never call a qcow2 / VHDX image raw unless told to
# check_not_raw IMG FMT: info (text, JSON) either fails cleanly naming the file
# and the format / "unsupported", or reports FMT; never raw.
check_not_raw() {
	local img=$1 fmt=$2 mode
	for mode in text json; do
		local opt=()
		[[ $mode == json ]] && opt=(--json)
		run "$BMIRROR" info "${opt[@]+"${opt[@]}"}" "$img"
		if ((RUN_RC == 0)); then
			if [[ $mode == json ]]; then
				cp -- "$RUN_OUT" "$T/nr.json"
				json_assert "$T/nr.json" "d['format'] == '$fmt'"
			else
				if grep -Eiq 'format:[[:space:]]*raw' "$RUN_OUT" || ! grep -Eq "^[[:space:]]*format: ${fmt}[[:space:]]*$" "$RUN_OUT"; then
					show_run "$BMIRROR" info "$img"
					fail "info on a $fmt image says raw (or not $fmt)"
				fi
			fi
			pass "info${opt[*]:+ ${opt[*]}} on $(basename -- "$img"): reported as $fmt"
		else
			expect_fail_with --names "$img" nonzero "unsupported|not supported|$fmt|format" \
				"$BMIRROR" info "${opt[@]+"${opt[@]}"}" "$img"
			if grep -Eiq '(^|[^a-z])raw([^a-z]|$)' "$RUN_OUT"; then
				show_run "$BMIRROR" info "$img"
				fail "info on a $fmt image printed 'raw' on stdout"
			fi
			pass "info${opt[*]:+ ${opt[*]}} on $(basename -- "$img"): refused (exit $RUN_RC), not treated as raw"
		fi
	done
}
run_ok qemu-img create -q -f qcow2 "$T/real.qcow2" 64M
check_not_raw "$T/real.qcow2" qcow2
run_ok qemu-img create -q -f vhdx "$T/real.vhdx" 64M
check_not_raw "$T/real.vhdx" vhdx

# a raw file whose first bytes are a magic: not raw without -f, raw with it
make_dense_image "$T/magic-qcow2.img" 1M
printf 'QFI\xfb' | dd of="$T/magic-qcow2.img" conv=notrunc status=none
make_dense_image "$T/magic-vhdx.img" 1M
printf 'vhdxfile' | dd of="$T/magic-vhdx.img" conv=notrunc status=none
for m in qcow2 vhdx; do
	img=$T/magic-$m.img
	run "$BMIRROR" info "$img"
	if ((RUN_RC == 0)) && grep -Eiq 'format:[[:space:]]*raw' "$RUN_OUT"; then
		show_run "$BMIRROR" info "$img"
		fail "info without -f treats a file starting with the $m magic as raw"
	fi
	if ((RUN_RC >= 126)); then
		show_run "$BMIRROR" info "$img"
		fail "info crashed on a file starting with the $m magic"
	fi
	pass "info without -f on a file starting with the $m magic: not reported as raw (exit $RUN_RC)"
	check_info "$img" -f raw
done

info "all info/create checks passed"
