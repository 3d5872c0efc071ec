#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# How `bmirror copy` does its I/O (issue 16), seen from outside:
#   - to an NBD server, requests of 256 KiB unless the server prefers
#     larger ones (nbdkit's log filter records every request; the
#     blocksize-policy filter advertises a preferred size);
#   - to a server that advertises multi-conn, writes spread over several
#     connections; to one that takes a single client (nbdkit's limit
#     filter), the extra connections are refused and the copy goes over
#     the one it got;
#   - the destination file is not left in the page cache (fincore), with
#     O_DIRECT (the default for a file destination) and through the page
#     cache (-t writeback), while the source keeps its pages (-T
#     writeback, the default);
#   - a qcow2 destination ends where its metadata says (qemu-img check's
#     image end offset is the file size: the file grows in steps while it
#     is written and is cut back at the flush).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img nbdkit fincore python3

SRC=$T/src.raw
make_dense_image "$SRC" $((24 * MiB))
sync "$SRC"

# largest_write LOG: the largest write count in an nbdkit log filter file.
largest_write() {
	python3 - "$1" <<'PY'
import re, sys
m = 0
for line in open(sys.argv[1]):
    if "Write" in line or "Zero" in line:
        c = re.search(r"count=(0x[0-9a-f]+|\d+)", line)
        if c and "Write" in line:
            m = max(m, int(c.group(1), 0))
print(m)
PY
}

copy_to_nbdkit() { # LABEL [FILTER-OPTION] [PARAMETERS...]
	local label=$1 sock=$T/$1.sock log=$T/$1.log filter=()
	shift
	if [[ ${1:-} == --filter=* ]]; then
		filter=("$1")
		shift
	fi
	nbdkit --exit-with-parent -f -U "$sock" --filter=log "${filter[@]}" \
		memory $((24 * MiB)) logfile="$log" "$@" &
	wait_for_socket "$sock"
	run_ok "$BMIRROR" copy -O raw "$SRC" "nbd+unix:///?socket=$sock"
	run_ok qemu-img compare -f raw -F raw "$SRC" "nbd+unix:///?socket=$sock"
	kill %% 2>/dev/null || true
	wait 2>/dev/null || true
	largest_write "$log"
}

# writers LOG: how many connections sent writes, in an nbdkit log file.
writers() { grep -oE 'connection=[0-9]+ Write ' "$1" | sort -u | wc -l; }

n=$(copy_to_nbdkit plain)
((n == 256 * KiB)) || fail "copy to nbdkit: largest write $n, want 256 KiB"
pass "copy to an NBD server: 256 KiB requests"

c=$(writers "$T/plain.log")
((c > 1)) || fail "copy to nbdkit (multi-conn): writes on $c connection(s)"
pass "copy to a multi-conn NBD server: writes over $c connections"

# One client at a time: nbdkit refuses the others.
truncate -s $((24 * MiB)) "$T/lim.raw"
nbdkit --exit-with-parent -f -U "$T/lim.sock" --filter=log --filter=limit \
	file file="$T/lim.raw" logfile="$T/lim.log" limit=1 2>"$T/lim.err" &
wait_for_socket "$T/lim.sock"
run_ok "$BMIRROR" copy -O raw "$SRC" "nbd+unix:///?socket=$T/lim.sock"
kill %% 2>/dev/null || true
wait 2>/dev/null || true
grep -q "too many clients" "$T/lim.err" ||
	fail "copy to a server taking one client: no extra connection tried"
c=$(writers "$T/lim.log")
((c == 1)) || fail "copy to a server taking one client: writes on $c connections"
run_ok qemu-img compare -f raw -F raw "$SRC" "$T/lim.raw"
pass "copy to an NBD server that takes one client: over that one"

n=$(copy_to_nbdkit pref --filter=blocksize-policy blocksize-preferred=1M)
((n == MiB)) || fail "copy to nbdkit preferring 1 MiB: largest write $n"
pass "copy to an NBD server that prefers 1 MiB: 1 MiB requests"

n=$(copy_to_nbdkit max --filter=blocksize-policy blocksize-maximum=64K)
((n <= 64 * KiB && n > 0)) || fail "copy to nbdkit with a 64 KiB maximum: largest write $n"
pass "copy to an NBD server with a 64 KiB maximum: no larger request"

# resident FILE: bytes of FILE in the page cache.
resident() { fincore --bytes --noheadings --output RES -- "$1" | tr -d ' '; }

rm -f "$T/d.raw"
run_ok "$BMIRROR" copy "$SRC" "$T/d.raw"
r=$(resident "$T/d.raw")
((r <= MiB)) || fail "a copy left $r bytes of its destination cached"
same_content "$SRC" "$T/d.raw"
pass "a copy leaves its destination out of the page cache ($r bytes cached)"

# drop FILE: evict FILE's pages from the page cache.
drop() { python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"; }

rm -f "$T/w.raw"
drop "$SRC"
run_ok "$BMIRROR" copy -t writeback "$SRC" "$T/w.raw"
r=$(resident "$T/w.raw")
((r <= MiB)) || fail "-t writeback left $r bytes of the destination cached"
s=$(resident "$SRC")
((s >= 20 * MiB)) || fail "-T writeback (the default) left only $s bytes of the source cached"
same_content "$SRC" "$T/w.raw"
pass "-t writeback: destination written back and dropped, source cached ($r and $s bytes)"

rm -f "$T/n.raw"
drop "$SRC"
run_ok "$BMIRROR" copy -T none "$SRC" "$T/n.raw"
s=$(resident "$SRC")
((s <= MiB)) || fail "-T none left $s bytes of the source cached"
same_content "$SRC" "$T/n.raw"
pass "-T none: the source is read past the page cache ($s bytes cached)"

expect_fail_with 2 "bad cache mode" "$BMIRROR" copy -t unsafe "$SRC" "$T/x.raw"
[[ ! -e $T/x.raw ]] || fail "a refused copy created its destination"
pass "-t with an unknown mode is refused"

# A qcow2 destination: the file ends at the image end offset.
rm -f "$T/d.qcow2"
run_ok "$BMIRROR" copy -O qcow2 "$SRC" "$T/d.qcow2"
run_ok qemu-img compare -f raw -F qcow2 "$SRC" "$T/d.qcow2"
run_ok qemu-img check --output=json "$T/d.qcow2"
end=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["image-end-offset"])' <"$RUN_OUT")
size=$(file_size "$T/d.qcow2")
((end == size)) || fail "qcow2 copy: file is $size bytes, image ends at $end"
pass "a qcow2 copy ends where its metadata says ($size bytes)"
