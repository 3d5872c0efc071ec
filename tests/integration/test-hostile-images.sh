#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Images whose backing file names are hostile (SECURITY.md, "Backing
# files"; docs/chains.md).  Every hostile image is made by qemu-img with
# -u, so nothing checks the name when it is written.  The top images live
# in $T/vm; $T/secret.txt lies outside it.
#
#   - a backing name that leaves the top image's directory tree ("../",
#     an absolute path, a symlink or a symlinked directory pointing out)
#     is refused, and the copy holds none of the secret;
#   - devices (/dev/zero, /dev/null) are refused, even in an allowed
#     directory, and so are FIFOs: an image whose backing file is a FIFO
#     fails at once (timeout makes a hang fail), and so does a FIFO named
#     on the command line;
#   - control bytes in a name are refused with a one-line message; a UTF-8
#     name inside the tree works;
#   - a backing file with no recorded format is probed only as qcow2 or
#     VHDX, never raw;
#   - a directory allowed with BLOCKMIRROR_ALLOW_BACKING_DIRS may hold
#     backing files, symlinks and "../" inside the tree work;
#   - a differencing VHDX reads its parent's identity while it opens: that
#     read is under the same policy, so a parent locator naming a FIFO fails
#     at once (also one level down the chain, and when the operator names
#     it as a parent), and one naming a VHDX outside the tree is refused
#     without its identity (DataWriteGuid) showing in the message;
#   - a loop (a -> b -> a) fails with a short message naming the images,
#     a chain of 32 backing files opens and one of 33 fails;
#   - moving a served overlay's base to an NBD URI is refused, and the
#     overlay still opens over its old base.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io qemu-nbd timeout mkfifo python3

# Every bmirror run here must end quickly: a hang is a failure.
TO=(timeout -k 5 20)
V=$T/vm
mkdir -p "$V/sub" "$T/shared"
SZ=$((1 * MiB))

# The secret: a raw file outside the tree, recognisable in a copy.
{ printf 'TOPSECRET-%.0s' {1..100}; head -c $((SZ - 1000)) /dev/zero; } >"$T/secret.txt"

evil() { # evil NAME BACKING [QEMU-IMG OPTIONS...]: a qcow2 in $V naming BACKING
	local name=$1 backing=$2
	shift 2
	rm -f -- "$V/$name"
	run_ok qemu-img create -q -f qcow2 -u -b "$backing" "$@" "$V/$name" "$SZ"
}

# forget_backing_format IMAGE: turn the qcow2 backing format extension into
# an unknown one, as in images from before QEMU recorded formats (qemu-img
# no longer writes such images itself).
forget_backing_format() {
	python3 - "$1" <<'EOF2' || fail "cannot edit $1"
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = f.read(4096)
    version = struct.unpack(">I", h[4:8])[0]
    pos = struct.unpack(">I", h[100:104])[0] if version >= 3 else 72
    while pos + 8 <= len(h):
        t, n = struct.unpack(">II", h[pos:pos + 8])
        if t == 0:
            break
        if t == 0xE2792ACA:
            f.seek(pos)
            f.write(struct.pack(">I", 0x6E6F6E65))
            sys.exit(0)
        pos += 8 + (n + 7) // 8 * 8
sys.exit(1)
EOF2
}

json_field() { # json_field KEY < JSON: one member of a JSON object, "" if absent
	python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], ""))' "$1"
}

copy_ok() { # copy_ok IMAGE OUT: bmirror copy -O raw must work (OUT replaced)
	rm -f -- "$2"
	run_ok "${TO[@]}" "$BMIRROR" copy -O raw "$1" "$2"
}

no_secret() { # no_secret FILE: FILE is absent or holds none of the secret
	[[ ! -e $1 ]] || ! grep -q TOPSECRET "$1" || fail "$1 holds the secret"
}

# refused NAME BACKING PATTERN [qemu-img options]: copying the image fails
# fast with one line matching PATTERN that names the image, and leaks nothing.
refused() {
	local name=$1 backing=$2 pattern=$3
	shift 3
	evil "$name" "$backing" "$@"
	rm -f "$T/out.raw"
	expect_fail_with --names "$V/$name" nonzero "$pattern" \
		"${TO[@]}" "$BMIRROR" copy -O raw "$V/$name" "$T/out.raw"
	((RUN_RC != 124)) || fail "bmirror copy $name timed out"
	no_secret "$T/out.raw"
}

# ---- leaving the tree ---------------------------------------------------------
refused dotdot.qcow2 ../secret.txt "backing file '\.\./secret\.txt'.*outside" -F raw
pass "a '../' backing name is refused and nothing leaks"
refused dotdot2.qcow2 sub/../../secret.txt "outside" -F raw
pass "a 'sub/../../' backing name is refused"
refused abs.qcow2 "$T/secret.txt" "backing file '$T/secret\.txt'.*outside" -F raw
pass "an absolute backing name outside the tree is refused"
refused abs-missing.qcow2 "$T/no-such-file" "outside" -F raw
pass "a missing file outside the tree is refused as outside (no probing)"
ln -s ../secret.txt "$V/link.raw"
refused symlink.qcow2 link.raw "'link\.raw'.*resolves to $T/secret\.txt.*outside" -F raw
pass "a symlink out of the tree is refused"
ln -s "$T" "$V/up"
refused symdir.qcow2 up/secret.txt "outside" -F raw
pass "a symlinked directory out of the tree is refused"

# ---- devices, FIFOs -----------------------------------------------------------
refused zero.qcow2 /dev/zero "'/dev/zero'.*outside" -F raw
pass "/dev/zero is refused"
refused null.qcow2 /dev/null "'/dev/null'.*outside" -F raw
pass "/dev/null is refused"
export BLOCKMIRROR_ALLOW_BACKING_DIRS=/dev
refused zero-allowed.qcow2 /dev/zero "/dev/zero.*character device" -F raw
pass "a character device is refused even in an allowed directory"
unset BLOCKMIRROR_ALLOW_BACKING_DIRS

mkfifo "$V/fifo"
refused fifo.qcow2 fifo "'fifo'.*FIFO" -F raw
pass "a FIFO backing file fails at once"
# Named by the operator: the open must not block either.
expect_fail_with --names "$V/fifo" nonzero "not a regular file or block device" \
	"${TO[@]}" "$BMIRROR" info "$V/fifo"
((RUN_RC != 124)) || fail "bmirror info on a FIFO timed out"
pass "a FIFO named on the command line fails at once"
refused dir.qcow2 sub "'sub'.*directory" -F raw
pass "a directory as the backing file is refused"

# A block device node inside the tree (loop0's numbers: the policy looks
# at the node, whatever the device holds).
if [[ $(id -u) == 0 ]] && mknod "$V/blk" b 7 0 2>/dev/null; then
	refused blk.qcow2 blk "'blk'.*block device.*BLOCKMIRROR_ALLOW_BACKING_DEVICES" -F raw
	BLOCKMIRROR_ALLOW_BACKING_DIRS=$V run "${TO[@]}" "$BMIRROR" info "$V/blk.qcow2"
	grep -q "block device" "$RUN_ERR" || { show_run; fail "an allowed directory let a block device through"; }
	BLOCKMIRROR_ALLOW_BACKING_DEVICES=$V run "${TO[@]}" "$BMIRROR" info "$V/blk.qcow2"
	((RUN_RC != 124)) && ! grep -q "refused" "$RUN_ERR" ||
		{ show_run; fail "BLOCKMIRROR_ALLOW_BACKING_DEVICES did not allow the block device"; }
	rm -f "$V/blk"
	pass "a block device is refused unless its directory allows devices"
else
	skip_subcase "a block device node needs root (mknod)"
fi

# ---- odd bytes ------------------------------------------------------------------
refused ctl.qcow2 $'base\n.raw' "control character" -F raw
refused ctl2.qcow2 $'\x01\x1b[2J' "control character" -F raw
pass "backing names with control bytes are refused in one line"
head -c "$SZ" /dev/urandom >"$V/bäse.raw"
evil utf8.qcow2 bäse.raw -F raw
copy_ok "$V/utf8.qcow2" "$T/out.raw"
cmp "$V/bäse.raw" "$T/out.raw" || fail "the UTF-8 named backing file read wrong"
pass "a UTF-8 backing name inside the tree works"

# ---- formats ----------------------------------------------------------------------
head -c "$SZ" /dev/urandom >"$V/plain.raw"
evil nofmt.qcow2 plain.raw -F raw
forget_backing_format "$V/nofmt.qcow2"
rm -f "$T/out.raw"
expect_fail_with --names "$V/nofmt.qcow2" nonzero "no recorded format.*qemu-img rebase" \
	"${TO[@]}" "$BMIRROR" copy -O raw "$V/nofmt.qcow2" "$T/out.raw"
pass "a backing file with no recorded format is never probed as raw"
run_ok qemu-img create -q -f qcow2 "$V/sub/base.qcow2" "$SZ"
run_ok qemu-io -f qcow2 -c "write -P 0x42 0 64k" "$V/sub/base.qcow2"
evil nofmt-qcow2.qcow2 sub/base.qcow2 -F qcow2
forget_backing_format "$V/nofmt-qcow2.qcow2"
copy_ok "$V/nofmt-qcow2.qcow2" "$T/out.raw"
run_ok qemu-img compare -q -F raw "$V/sub/base.qcow2" "$T/out.raw"
pass "a qcow2 backing file with no recorded format is probed and works"

# ---- VHDX parents ----------------------------------------------------------------
# qemu-img cannot make a differencing VHDX: bmirror makes the child over a
# real parent, which is then swapped for a FIFO or changed behind its back.
# The driver reads the parent's identity (the linkage check) before the
# engine opens it: a plain open() there would hang on the FIFO and tell
# the DataWriteGuid of whatever VHDX the locator names.
vhdx_child() { # vhdx_child CHILD PARENT: a differencing VHDX in $V over PARENT
	rm -f -- "$V/$1"
	run_ok "${TO[@]}" "$BMIRROR" create -f vhdx -o "parent=$2" "$V/$1" "$SZ"
}
run_ok "${TO[@]}" "$BMIRROR" create -f vhdx "$V/vfifo.vhdx" "$SZ"
vhdx_child vfifo-child.vhdx vfifo.vhdx
vhdx_child vfifo-mid.vhdx vfifo.vhdx
vhdx_child vfifo-top.vhdx vfifo-mid.vhdx
run_ok "${TO[@]}" "$BMIRROR" info "$V/vfifo-top.vhdx"
rm -f "$V/vfifo.vhdx"
mkfifo "$V/vfifo.vhdx"
rm -f "$T/out.raw"
expect_fail_with --names "$V/vfifo-child.vhdx" nonzero "'vfifo\.vhdx'.*FIFO" \
	"${TO[@]}" "$BMIRROR" copy -O raw "$V/vfifo-child.vhdx" "$T/out.raw"
((RUN_RC != 124)) || fail "a VHDX child of a FIFO timed out"
expect_fail_with --names "$V/vfifo-top.vhdx" nonzero "in its backing chain: .*'vfifo\.vhdx'.*FIFO" \
	"${TO[@]}" "$BMIRROR" info "$V/vfifo-top.vhdx"
((RUN_RC != 124)) || fail "a VHDX chain ending in a FIFO timed out"
expect_fail_with nonzero "FIFO" \
	"${TO[@]}" "$BMIRROR" create -f vhdx -o parent=vfifo.vhdx "$V/vfifo-new.vhdx" "$SZ"
((RUN_RC != 124)) || fail "creating a VHDX child of a FIFO timed out"
pass "a differencing VHDX whose parent is a FIFO fails at once"

# A parent outside the tree: made while its directory was allowed, then
# replaced by another VHDX (so its DataWriteGuid is not the linkage).
mkdir -p "$T/vout"
run_ok "${TO[@]}" "$BMIRROR" create -f vhdx "$T/vout/parent.vhdx" "$SZ"
BLOCKMIRROR_ALLOW_BACKING_DIRS=$T/vout vhdx_child vout-child.vhdx "$T/vout/parent.vhdx"
BLOCKMIRROR_ALLOW_BACKING_DIRS=$T/vout run_ok "${TO[@]}" "$BMIRROR" info "$V/vout-child.vhdx"
rm -f "$T/vout/parent.vhdx"
run_ok "${TO[@]}" "$BMIRROR" create -f vhdx "$T/vout/parent.vhdx" "$SZ"
rm -f "$T/out.raw"
expect_fail_with --names "$V/vout-child.vhdx" nonzero \
	"'$T/vout/parent\.vhdx'.*outside.*BLOCKMIRROR_ALLOW_BACKING_DIRS" \
	"${TO[@]}" "$BMIRROR" copy -O raw "$V/vout-child.vhdx" "$T/out.raw"
grep -qi "DataWriteGuid" "$RUN_ERR" && fail "the refusal tells the outside parent's identity: $(cat "$RUN_ERR")"
[[ ! -s $T/out.raw ]] || fail "a copy was made over a parent outside the tree"
# Allowed, the same child is checked against its parent, and fails on the
# linkage (the parent changed since the child was made).
BLOCKMIRROR_ALLOW_BACKING_DIRS=$T/vout expect_fail_with --names "$V/vout-child.vhdx" \
	nonzero "DataWriteGuid.*not the linkage" "${TO[@]}" "$BMIRROR" info "$V/vout-child.vhdx"
pass "a differencing VHDX whose parent is outside the tree is refused without reading it"

# ---- legitimate chains ------------------------------------------------------------
# Relative, in a subdirectory, "../" that stays inside (sub/mid.qcow2
# names ../sub/base.qcow2), a symlink inside, an absolute name inside.
evil ok-sub.qcow2 sub/base.qcow2 -F qcow2
run_ok qemu-img create -q -f qcow2 -u -b ../sub/base.qcow2 -F qcow2 "$V/sub/mid.qcow2" "$SZ"
evil top2.qcow2 sub/mid.qcow2 -F qcow2
ln -s sub/base.qcow2 "$V/base-link.qcow2"
evil ok-link.qcow2 base-link.qcow2 -F qcow2
evil ok-abs.qcow2 "$V/sub/base.qcow2" -F qcow2
for img in ok-sub.qcow2 top2.qcow2 ok-link.qcow2 ok-abs.qcow2; do
	copy_ok "$V/$img" "$T/out.raw"
	run_ok qemu-img compare -q -F raw "$V/sub/base.qcow2" "$T/out.raw"
done
rm -f "$T/out.raw"
pass "chains inside the tree (subdirectory, ../ inside, symlink, absolute) work"

# A base in another directory: refused, until that directory is allowed.
run_ok qemu-img create -q -f qcow2 "$T/shared/base.qcow2" "$SZ"
run_ok qemu-io -f qcow2 -c "write -P 0x43 0 64k" "$T/shared/base.qcow2"
evil shared.qcow2 "$T/shared/base.qcow2" -F qcow2
expect_fail_with --names "$V/shared.qcow2" nonzero "outside.*BLOCKMIRROR_ALLOW_BACKING_DIRS" \
	"${TO[@]}" "$BMIRROR" info "$V/shared.qcow2"
BLOCKMIRROR_ALLOW_BACKING_DIRS="/nonexistent:$T/shared" \
	copy_ok "$V/shared.qcow2" "$T/out.raw"
run_ok qemu-img compare -q -F raw "$T/shared/base.qcow2" "$T/out.raw"
pass "a backing directory allowed with BLOCKMIRROR_ALLOW_BACKING_DIRS works"

# ---- loops and depth ----------------------------------------------------------------
evil a.qcow2 b.qcow2 -F qcow2
evil b.qcow2 a.qcow2 -F qcow2
expect_fail_with --names "$V/a.qcow2" nonzero "loop" "${TO[@]}" "$BMIRROR" info "$V/a.qcow2"
grep -q "b\.qcow2" "$RUN_ERR" || fail "the loop message does not name b.qcow2: $(cat "$RUN_ERR")"
(($(wc -c <"$RUN_ERR") < 400)) || fail "the loop message is $(wc -c <"$RUN_ERR") bytes: $(cat "$RUN_ERR")"
LC_ALL=C grep -q '[^[:print:]]' "$RUN_ERR" && fail "the loop message has unprintable bytes"
pass "a backing loop fails with a short, readable message naming the images"
evil self.qcow2 self.qcow2 -F qcow2
expect_fail_with --names "$V/self.qcow2" nonzero "loop" "${TO[@]}" "$BMIRROR" info "$V/self.qcow2"
pass "an image that is its own backing file is a loop"

mkdir "$T/deep"
run_ok qemu-img create -q -f qcow2 "$T/deep/c0.qcow2" "$SZ"
run_ok qemu-io -f qcow2 -c "write -P 0x61 0 4k" "$T/deep/c0.qcow2"
for ((i = 1; i <= 33; i++)); do
	run_ok qemu-img create -q -f qcow2 -u -b "c$((i - 1)).qcow2" -F qcow2 "$T/deep/c$i.qcow2" "$SZ"
done
copy_ok "$T/deep/c32.qcow2" "$T/out.raw"
run_ok qemu-img compare -q -F raw "$T/deep/c0.qcow2" "$T/out.raw"
pass "a chain of 32 backing files opens"
expect_fail_with --names "$T/deep/c33.qcow2" nonzero "deeper than 32" \
	"${TO[@]}" "$BMIRROR" info "$T/deep/c33.qcow2"
pass "a chain of 33 backing files is refused"

# ---- moving a base to an NBD URI ----------------------------------------------------
run_ok qemu-img create -q -f qcow2 "$V/nbase.qcow2" "$SZ"
run_ok qemu-io -f qcow2 -c "write -P 0x51 0 128k" "$V/nbase.qcow2"
(cd "$V" && run_ok qemu-img create -q -f qcow2 -b nbase.qcow2 -F qcow2 ntop.qcow2)
run_ok qemu-img convert -O raw "$V/nbase.qcow2" "$T/nbase-copy.raw"
qemu-nbd -f raw -k "$T/other.sock" --persistent "$T/nbase-copy.raw" 2>"$T/qemu-nbd.err" &
NBD_PID=$!
wait_for_socket "$T/other.sock"
start_serve "$V/ntop.qcow2"
run "${TO[@]}" "$BMIRROR" move --control "$T/ctl.sock" --base --to "nbd+unix:///?socket=$T/other.sock"
((RUN_RC != 0)) || { show_run; fail "a base move to an NBD URI was done"; }
grep -Eiq "NBD|not a local" "$RUN_ERR" || { show_run; fail "the refusal does not say why"; }
stop_serve
kill "$NBD_PID"
wait "$NBD_PID" 2>/dev/null || true
[[ $(qemu-img info --output=json "$V/ntop.qcow2" | json_field backing-filename) == nbase.qcow2 ]] ||
	fail "the overlay no longer names nbase.qcow2"
run_ok "${TO[@]}" "$BMIRROR" info "$V/ntop.qcow2"
pass "a base move to an NBD URI is refused; the overlay still opens over its base"
