#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Backing chains (docs/chains.md).  qcow2 chains of depth 1 to 3 made by
# `qemu-img create -b` are served by `bmirror serve` while fio (nbd engine,
# crc32c verify headers) writes through the top image, and moved with each
# sync mode:
#   full  the destination is the flattened chain, with no backing file;
#   top   only the top layer is copied, the destination gets the top's
#         backing file (and qemu-img sees the same chain below it);
#   none  the destination chain is prepared here (a flattened copy of the
#         served disk as its base, a new overlay on it) and the move only
#         mirrors new writes.
# Afterwards the source at the pivot and the destination read the same
# (qemu-img compare), fio's verify pass finds every block it wrote, and
# `qemu-img info --backing-chain` shows the expected chain.
#
# Then the base of a live overlay is moved (`bmirror move --base`), once
# cleanly and then CHAINS_KILLS times (default 30) with the server killed
# with SIGKILL at a random moment of the move and its pivot: every time
# the overlay opens clean (`qemu-img check`), names either the old or the
# new base, and reads what was acknowledged before the kill.
#
# Last, VHDX, checked with bmirror itself (QEMU does not open differencing
# VHDX): --shallow to a new VHDX, a base move, and CHAINS_VHDX_KILLS
# (default 10) killed base moves.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires fio qemu-img qemu-io
fio --enghelp 2>/dev/null | grep -qw nbd || skip_test "fio has no nbd engine"

SIZE=$((16 * MiB))
KILLS=${CHAINS_KILLS:-30}

# fio over the first quarter of the served disk, so the top layer keeps
# holes that the chain below fills.
FIO_CHAIN=(--name=guest --ioengine=nbd --rw=randwrite --bs=4k --iodepth=8
	--size=25% --verify=crc32c --randseed=99 --verify_state_save=0)
chain_fio_write() {
	fio "${FIO_CHAIN[@]}" --uri="nbd+unix:///?socket=$T/nbd.sock" \
		--do_verify=0 --rate_iops=2000 --output="$1" >/dev/null 2>&1
}
chain_fio_verify() {
	run fio "${FIO_CHAIN[@]}" --uri="nbd+unix:///?socket=$T/nbd.sock" \
		--verify_only --output="$T/fio-verify.out"
	((RUN_RC == 0)) && grep -q "err= 0" "$T/fio-verify.out" ||
		{ cat "$T/fio-verify.out" >&2; fail "fio verify failed: $1"; }
}

# make_chain DEPTH: $T/b0.qcow2 .. b(DEPTH-1) and the top $T/top.qcow2,
# each layer with its own data (layer i writes 1 MiB at (2i+4) MiB, and
# overwrites part of the layer below).  Relative backing names, as
# `qemu-img create -b` in the same directory makes them.
make_chain() {
	local depth=$1 i below
	rm -f "$T"/b*.qcow2 "$T/top.qcow2"
	run_ok qemu-img create -q -f qcow2 "$T/b0.qcow2" "$SIZE"
	run_ok qemu-io -f qcow2 -c "write -P 0x10 4M 1M" -c "write -P 0x11 12M 64k" "$T/b0.qcow2"
	below=b0.qcow2
	for ((i = 1; i < depth; i++)); do
		run_ok qemu-img create -q -f qcow2 -b "$below" -F qcow2 "$T/b$i.qcow2"
		run_ok qemu-io -f qcow2 -c "write -P $((0x10 + 2 * i)) $((2 * i + 4))M 1M" \
			-c "write -P 0x$((i + 2))3 4M 64k" "$T/b$i.qcow2"
		below=b$i.qcow2
	done
	run_ok qemu-img create -q -f qcow2 -b "$below" -F qcow2 "$T/top.qcow2"
	run_ok qemu-io -f qcow2 -c "write -P 0x55 14M 1M" -c "write -P 0x56 4M 8k" "$T/top.qcow2"
	TOP_BACKING=$below
}

# chain_names IMAGE: the filenames of IMAGE's chain, top first, one a line.
chain_names() {
	qemu-img info --backing-chain --output=json "$1" |
		python3 -c 'import json,sys; print("\n".join(i["filename"] for i in json.load(sys.stdin)))'
}

run "$BMIRROR" move --control "$T/nothing.sock" --to "$T/x.qcow2" --sync bogus
((RUN_RC == 2)) && grep -q "sync takes full, top or none" "$RUN_ERR" ||
	{ show_run; fail "--sync bogus is not a usage error"; }
pass "--sync with a bad mode is a usage error"

chains_t0=$(date +%s)
for depth in 1 2 3; do
	for sync in full top none; do
		make_chain "$depth"
		rm -f "$T"/dst*.qcow2
		sync_args=(--sync "$sync")
		if [[ $sync == none ]]; then
			# The caller's copy of everything below: here the whole
			# guest view, flattened, under a new overlay.
			run_ok qemu-img convert -O qcow2 "$T/top.qcow2" "$T/dst-base.qcow2"
			run_ok qemu-img create -q -f qcow2 -b "$T/dst-base.qcow2" -F qcow2 "$T/dst.qcow2"
		elif [[ $sync == top && $depth == 1 ]]; then
			# An existing destination is used with its own chain
			# (REUSE_EXT): here an overlay of the same base.
			(cd "$T" && run_ok qemu-img create -q -f qcow2 -b "$TOP_BACKING" -F qcow2 dst.qcow2)
		elif [[ $sync == top && $depth == 2 ]]; then
			sync_args=(--shallow)
		fi
		start_serve "$T/top.qcow2"
		if [[ $sync == none ]]; then
			# Nothing may be written between the caller's copy and
			# the start of the move: the move goes first, then fio.
			run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/dst.qcow2" \
				--sync none --no-pivot --json
			chain_fio_write "$T/fio.out" || { cat "$T/fio.out" >&2; fail "fio failed (none, depth $depth)"; }
		else
			chain_fio_write "$T/fio.out" &
			fio_pid=$!
			sleep 0.3
			run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/dst.qcow2" \
				"${sync_args[@]}" --no-pivot --json
			wait "$fio_pid" || { cat "$T/fio.out" >&2; fail "fio failed ($sync, depth $depth)"; }
		fi
		grep -q '"event":"READY"' "$RUN_OUT" || fail "no READY ($sync, depth $depth)"
		run_ok "$BMIRROR" complete --control "$T/ctl.sock"
		chain_fio_verify "after the move ($sync, depth $depth)"
		stop_serve
		# The source stopped at the pivot: both guest views are equal.
		run_ok qemu-img compare "$T/top.qcow2" "$T/dst.qcow2"
		run_ok qemu-img check -q "$T/dst.qcow2"
		mapfile -t names < <(chain_names "$T/dst.qcow2")
		case $sync in
		full)
			((${#names[@]} == 1)) || fail "full: the destination has a backing chain: ${names[*]}"
			;;
		top)
			((${#names[@]} == depth + 1)) || fail "top: chain ${names[*]}, expected depth $depth"
			[[ $(realpath "${names[1]}") == "$(realpath "$T/$TOP_BACKING")" ]] ||
				fail "top: destination backing ${names[1]}, expected $TOP_BACKING"
			# Only the top layer was copied: the base's 1 MiB at 12M
			# (only b0 has it) is not allocated in the destination.
			qemu-img map --output=json "$T/dst.qcow2" | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["start"] <= 12 << 20 < e["start"] + e["length"]:
        sys.exit(0 if e["depth"] > 0 else 1)
sys.exit(1)' || fail "top: the base layer was copied into the destination"
			run_ok "$BMIRROR" info --backing-chain "$T/dst.qcow2"
			grep -q "b0.qcow2" "$RUN_OUT" || fail "bmirror info --backing-chain misses the base"
			;;
		none)
			((${#names[@]} == 2)) && [[ ${names[1]} == "$T/dst-base.qcow2" ]] ||
				fail "none: destination chain ${names[*]}"
			;;
		esac
		pass "sync $sync, chain depth $depth: same guest view, expected chain (${#names[@]} images)"
	done
done
info "sync modes: $(($(date +%s) - chains_t0)) s"

# ---- moving the base under a live overlay -----------------------------------
# base.qcow2 <- top.qcow2 (relative name, as qemu-img writes it).  Through
# the server, one write and a flush go to the overlay: that is what was
# acknowledged.  The expected guest view is made offline the same way.
make_base_chain() {
	rm -f "$T/base.qcow2" "$T/top.qcow2" "$T/newbase.qcow2"
	cp "$T/tmpl-base.qcow2" "$T/base.qcow2"
	cp "$T/tmpl-top.qcow2" "$T/top.qcow2"
}
acked_write() {
	run_ok qemu-io -f raw -c "write -P 0x77 2M 192k" -c flush \
		"nbd+unix:///?socket=$T/nbd.sock"
}
rm -f "$T/base.qcow2" "$T/top.qcow2"
run_ok qemu-img create -q -f qcow2 "$T/base.qcow2" "$SIZE"
run_ok qemu-io -f qcow2 -c "write -P 0x21 0 3M" -c "write -P 0x22 8M 4M" "$T/base.qcow2"
(cd "$T" && run_ok qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2)
run_ok qemu-io -f qcow2 -c "write -P 0x31 9M 64k" "$T/top.qcow2"
mv "$T/base.qcow2" "$T/tmpl-base.qcow2"
mv "$T/top.qcow2" "$T/tmpl-top.qcow2"
make_base_chain
run_ok qemu-io -f qcow2 -c "write -P 0x77 2M 192k" "$T/top.qcow2"
run_ok qemu-img convert -O raw "$T/top.qcow2" "$T/expected.raw"

# A clean move, timed: the kills below land within its duration.
make_base_chain
start_serve "$T/top.qcow2"
acked_write
t_ms0=$(date +%s%3N)
run_ok "$BMIRROR" move --control "$T/ctl.sock" --base --to "$T/newbase.qcow2" --json
BASE_MOVE_MS=$(($(date +%s%3N) - t_ms0))
grep -q '"event":"COMPLETED"' "$RUN_OUT" || fail "base move: no COMPLETED event"
fio_out=$T/fio-base.out
chain_fio_write "$fio_out" || { cat "$fio_out" >&2; fail "fio after the base move"; }
chain_fio_verify "after the base move"
stop_serve
mapfile -t names < <(chain_names "$T/top.qcow2")
((${#names[@]} == 2)) && [[ ${names[1]} == "$T/newbase.qcow2" ]] ||
	fail "base move: chain is ${names[*]}"
run_ok qemu-img check -q "$T/top.qcow2"
run_ok "$BMIRROR" info --backing-chain "$T/top.qcow2"
grep -q "newbase.qcow2" "$RUN_OUT" || fail "bmirror info --backing-chain does not show the new base"
pass "base moved under the live overlay in ${BASE_MOVE_MS} ms; fio verify and qemu-img see the new chain"

# SIGKILL at random moments of the move (copy, verify, the pivot).
kill_old=0 kill_new=0
kills_t0=$(date +%s)
window=$((BASE_MOVE_MS + BASE_MOVE_MS / 5 + 5))
for ((k = 0; k < KILLS; k++)); do
	make_base_chain
	start_serve "$T/top.qcow2"
	acked_write
	"$BMIRROR" move --control "$T/ctl.sock" --base --to "$T/newbase.qcow2" \
		--json >"$T/move.out" 2>&1 &
	move_pid=$!
	# Every other kill aims at the end of the move, where the pivot is.
	if ((k % 2)); then
		delay=$((BASE_MOVE_MS * 6 / 10 + RANDOM % (BASE_MOVE_MS / 2 + 1)))
	else
		delay=$((RANDOM % window))
	fi
	sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
	kill -KILL "$SERVE_PID"
	wait "$SERVE_PID" 2>/dev/null || true
	wait "$move_pid" 2>/dev/null || true
	SERVE_PID=
	run qemu-img check -q "$T/top.qcow2"
	((RUN_RC == 0)) || { show_run; fail "kill $k (after ${delay} ms): qemu-img check"; }
	name=$(qemu-img info --output=json "$T/top.qcow2" |
		python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename", ""))')
	case $name in
	base.qcow2) kill_old=$((kill_old + 1)) ;;
	"$T/newbase.qcow2") kill_new=$((kill_new + 1)) ;;
	*) fail "kill $k (after ${delay} ms): backing file name '$name'" ;;
	esac
	run qemu-img compare -q -F raw "$T/top.qcow2" "$T/expected.raw"
	((RUN_RC == 0)) || { show_run; fail "kill $k (after ${delay} ms, backing $name): guest view differs"; }
done
pass "$KILLS kills during base moves: chain clean and reads right every time ($kill_old old base, $kill_new new base)"
info "kills: $(($(date +%s) - kills_t0)) s"

# ---- VHDX: sync top and a base move (QEMU cannot open differencing VHDX:
# bmirror checks the chain) -------------------------------------------------
VKILLS=${CHAINS_VHDX_KILLS:-10}
rm -f "$T"/v*.vhdx "$T/vexp.raw"
run_ok qemu-img create -q -f raw "$T/vexp.raw" "$SIZE"
run_ok qemu-io -f raw -c "write -P 0x44 0 4M" "$T/vexp.raw"
run_ok "$BMIRROR" copy -O vhdx "$T/vexp.raw" "$T/vtmpl-p.vhdx"
make_vhdx_chain() {
	rm -f "$T/vp.vhdx" "$T/vc.vhdx" "$T/vnewp.vhdx" "$T/vdst.vhdx"
	cp "$T/vtmpl-p.vhdx" "$T/vp.vhdx"
	run_ok "$BMIRROR" create -f vhdx -o "parent=$T/vp.vhdx" "$T/vc.vhdx" "$SIZE"
}
vhdx_backing() {
	"$BMIRROR" info --json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename", ""))'
}
run_ok qemu-io -f raw -c "write -P 0x55 1M 64k" "$T/vexp.raw"

make_vhdx_chain
start_serve "$T/vc.vhdx"
acked_write_vhdx() {
	run_ok qemu-io -f raw -c "write -P 0x55 1M 64k" -c flush \
		"nbd+unix:///?socket=$T/nbd.sock"
}
acked_write_vhdx
run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/vdst.vhdx" --shallow --json
stop_serve
[[ $(vhdx_backing "$T/vdst.vhdx") == "$T/vp.vhdx" ]] || fail "vhdx top: the destination's parent is not the source's"
run_ok "$BMIRROR" verify "$T/vdst.vhdx" "$T/vexp.raw"
pass "vhdx sync top: the new destination has the source's parent and reads the same"

make_vhdx_chain
start_serve "$T/vc.vhdx"
acked_write_vhdx
run_ok "$BMIRROR" move --control "$T/ctl.sock" --base --to "$T/vnewp.vhdx" --json
stop_serve
rm -f "$T/vp.vhdx"
[[ $(vhdx_backing "$T/vc.vhdx") == "$T/vnewp.vhdx" ]] || fail "vhdx base move: the parent is not the new one"
run_ok "$BMIRROR" verify "$T/vc.vhdx" "$T/vexp.raw"
pass "vhdx base moved under the live child: it opens over the new parent alone"

vk_old=0 vk_new=0
for ((k = 0; k < VKILLS; k++)); do
	make_vhdx_chain
	start_serve "$T/vc.vhdx"
	acked_write_vhdx
	"$BMIRROR" move --control "$T/ctl.sock" --base --to "$T/vnewp.vhdx" \
		--json >"$T/move.out" 2>&1 &
	move_pid=$!
	delay=$((RANDOM % (BASE_MOVE_MS * 3 + 20)))
	sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
	kill -KILL "$SERVE_PID"
	wait "$SERVE_PID" 2>/dev/null || true
	wait "$move_pid" 2>/dev/null || true
	SERVE_PID=
	name=$(vhdx_backing "$T/vc.vhdx")
	case $name in
	"$T/vp.vhdx") vk_old=$((vk_old + 1)) ;;
	"$T/vnewp.vhdx") vk_new=$((vk_new + 1)) ;;
	*) fail "vhdx kill $k (after ${delay} ms): parent '$name'" ;;
	esac
	run "$BMIRROR" verify "$T/vc.vhdx" "$T/vexp.raw"
	((RUN_RC == 0)) || { show_run; fail "vhdx kill $k (after ${delay} ms, parent $name): guest view differs"; }
done
pass "$VKILLS kills during vhdx base moves: the child opens and reads right ($vk_old old parent, $vk_new new parent)"
