#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The formats through the tools: offline conversion between raw, qcow2 and
# VHDX in every direction, a qcow2 chain copied as its flattened guest
# view, and live moves of qcow2 and VHDX disks (and a raw disk converted to
# qcow2 on the way) while fio writes through `bmirror serve`.
#
# qemu-img is the oracle: `compare` says the guest data is identical,
# `check` says our images are consistent, and `map` says the copies stayed
# sparse.  The VHDX Page 83 identity survives copies and moves.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img fio python3
fio --enghelp 2>/dev/null | grep -qw nbd || skip_test "fio has no nbd engine"

# Bytes the file holds on disk (st_blocks): what sparseness saves.
disk_bytes() {
	echo $(($(stat -c %b "$1") * $(stat -c %B "$1")))
}

# qemu-img info as one JSON line in $T/info.json, for json_assert.
qemu_info() {
	run_ok qemu-img info --output=json "$1"
	python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' \
		"$RUN_OUT" > "$T/info.json"
}

check_image() { # check_image PATH FMT
	[[ $2 == raw ]] && return 0
	run_ok qemu-img check -f "$2" "$1"
}

# ---- conversions ---------------------------------------------------------
make_mixed_image "$T/orig.raw"
orig_data=$(disk_bytes "$T/orig.raw")
declare -A opts=([raw]="" [qcow2]="" [vhdx]="block_size=1M")
prev=orig.raw prevfmt=raw
for step in qcow2 vhdx raw vhdx qcow2 raw; do
	out="conv-$step-from-$prevfmt.$step"
	run_ok "$BMIRROR" copy -O "$step" ${opts[$step]:+-o "${opts[$step]}"} "$T/$prev" "$T/$out"
	check_image "$T/$out" "$step"
	run_ok qemu-img compare -f raw -F "$step" "$T/orig.raw" "$T/$out"
	d=$(disk_bytes "$T/$out")
	# Sparse: no more than the original's data plus one allocation
	# unit per data extent and the metadata.
	((d <= orig_data + 8 * MiB)) || fail "$prevfmt -> $step: the copy holds $d bytes, the original $orig_data"
	pass "$prevfmt -> $step: identical, consistent and sparse ($d bytes on disk)"
	prev=$out prevfmt=$step
done

# The default VHDX block size (32 MiB) too.
run_ok "$BMIRROR" copy -O vhdx "$T/orig.raw" "$T/big-blocks.vhdx"
check_image "$T/big-blocks.vhdx" vhdx
run_ok qemu-img compare -f raw -F vhdx "$T/orig.raw" "$T/big-blocks.vhdx"
pass "raw -> vhdx with the default block size"

# qcow2 options pass through copy -o.
run_ok "$BMIRROR" copy -O qcow2 -o cluster_size=4K "$T/orig.raw" "$T/c4k.qcow2"
qemu_info "$T/c4k.qcow2"
json_assert "$T/info.json" "d['cluster-size'] == 4096"
run_ok qemu-img compare -f raw -F qcow2 "$T/orig.raw" "$T/c4k.qcow2"
pass "copy -o cluster_size=4K makes 4 KiB clusters"

# ---- a chain copied flattened --------------------------------------------
run_ok qemu-img convert -O qcow2 "$T/orig.raw" "$T/base.qcow2"
run_ok qemu-img create -f qcow2 -b base.qcow2 -F qcow2 "$T/mid.qcow2"
run_ok qemu-io -f qcow2 -c "write -P 0x5a 1M 64k" -c "write -z 3M 64k" "$T/mid.qcow2"
run_ok qemu-img create -f qcow2 -b mid.qcow2 -F qcow2 "$T/top.qcow2"
run_ok qemu-io -f qcow2 -c "write -P 0xa5 7M 4k" -c "discard 12M 64k" "$T/top.qcow2"
run_ok "$BMIRROR" copy -O raw "$T/top.qcow2" "$T/flat.raw"
run_ok qemu-img compare -f qcow2 -F raw "$T/top.qcow2" "$T/flat.raw"
run_ok "$BMIRROR" copy "$T/top.qcow2" "$T/flat.qcow2"
check_image "$T/flat.qcow2" qcow2
qemu_info "$T/flat.qcow2"
json_assert "$T/info.json" "'backing-filename' not in d"
run_ok qemu-img compare "$T/top.qcow2" "$T/flat.qcow2"
pass "a three-image qcow2 chain copies as its flattened guest view"

run_ok "$BMIRROR" info --backing-chain --json "$T/top.qcow2"
python3 - "$RUN_OUT" <<'PY' || fail "info --backing-chain: wrong chain"
import json, sys
d = json.load(open(sys.argv[1]))
assert [i['format'] for i in d] == ['qcow2'] * 3, d
assert [i['filename'].rsplit('/', 1)[1] for i in d] == ['top.qcow2', 'mid.qcow2', 'base.qcow2'], d
assert d[0]['backing-filename'] == 'mid.qcow2' and 'backing-filename' not in d[2], d
PY
pass "info --backing-chain lists the three images"

# ---- VHDX identity --------------------------------------------------------
run_ok "$BMIRROR" create -f vhdx "$T/id.vhdx" 16M
run_ok "$BMIRROR" info --json "$T/id.vhdx"
id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["page83-identity"])' "$RUN_OUT")
run_ok "$BMIRROR" copy "$T/id.vhdx" "$T/id-copy.vhdx"
run_ok "$BMIRROR" info --json "$T/id-copy.vhdx"
json_assert "$RUN_OUT" "d['page83-identity'] == '$id'"
run_ok "$BMIRROR" copy -O vhdx "$T/orig.raw" "$T/fresh.vhdx"
run_ok "$BMIRROR" info --json "$T/fresh.vhdx"
json_assert "$RUN_OUT" "d['page83-identity'] != '$id'"
pass "a VHDX copy keeps the Page 83 identity; a new VHDX gets its own"

# ---- live moves under fio --------------------------------------------------
SIZE=$((64 * MiB))
live_move() { # live_move SRC-FMT DST-FMT MODE
	local sf=$1 df=$2 mode=$3 src="$T/live-src.$1" dst="$T/live-dst.$2"
	rm -f "$src" "$dst" "$T/disk"
	if [[ $sf == raw ]]; then
		truncate -s "$SIZE" "$src"
	else
		run_ok qemu-img create -f "$sf" "$src" "$SIZE"
	fi
	ln -sfn "$src" "$T/disk"
	start_serve "$T/disk" --link
	fio_write "$T/fio.out" 4000 &
	local fio_pid=$!
	sleep 1
	run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$dst" -O "$df" \
		--mode "$mode" --json
	wait "$fio_pid" || { cat "$T/fio.out" >&2; fail "$sf -> $df: fio saw an error"; }
	[[ $(readlink "$T/disk") == "$dst" ]] || fail "$sf -> $df: the link does not name the destination"
	fio_verify "$sf -> $df ($mode)"
	stop_serve
	check_image "$dst" "$df"
	check_image "$src" "$sf"
	pass "live move $sf -> $df ($mode) under fio: verified, consistent"
}
live_move qcow2 qcow2 active
live_move vhdx vhdx active
live_move raw qcow2 background
live_move qcow2 vhdx active

# The moved VHDX keeps its identity.
rm -f "$T/idm-dst.vhdx"
start_serve "$T/id.vhdx"
run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/idm-dst.vhdx" --json
stop_serve
run_ok "$BMIRROR" info --json "$T/idm-dst.vhdx"
json_assert "$RUN_OUT" "d['page83-identity'] == '$id'"
pass "a moved VHDX keeps the Page 83 identity"
