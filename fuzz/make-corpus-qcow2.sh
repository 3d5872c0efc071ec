#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Regenerate fuzz/corpus/qcow2: small qcow2 images written by qemu-img and
# qemu-io (512-byte and 4 KiB clusters, v2 and v3, zero and compressed
# clusters, a backing name, snapshots, bitmaps, extended L2), and one
# mutation of a base image for each corruption case of formats.md 3.1.
# Big-cluster images are cut after their header: the driver reads
# tables past the end of the file as zeroes, as QEMU does.
set -euo pipefail
out=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/corpus/qcow2
tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
mkdir -p -- "$out"
rm -f -- "$out"/*

io() { qemu-io -f qcow2 "$@" >/dev/null; }

poke() {
	python3 - "$@" <<'PY'
import struct, sys
path, off, fmt, val = sys.argv[1], int(sys.argv[2], 0), sys.argv[3], int(sys.argv[4], 0)
with open(path, "r+b") as f:
    f.seek(off)
    f.write(struct.pack(">" + fmt, val & ((1 << (8 * struct.calcsize(fmt))) - 1)))
PY
}

peek() {
	python3 -c 'import struct,sys; f=open(sys.argv[1],"rb"); f.seek(int(sys.argv[2],0)); print(struct.unpack(">Q", f.read(8))[0])' "$1" "$2"
}

for compat in 0.10 1.1; do
	img=$tmp/v$compat.qcow2
	qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=512 "$img" 1M
	io -c 'write -P 0x5a 0 3000' -c 'write -P 0xa5 600k 1k' "$img"
	[[ $compat == 1.1 ]] && io -c 'write -z 100k 4k' -c 'discard 0 512' "$img"
	cp -- "$img" "$out/v$compat-512.qcow2"
done

head -c 40000 /dev/urandom >"$tmp/src.raw"
python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256)) * 100)' >>"$tmp/src.raw"
for ct in zlib zstd; do
	qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4K,compression_type=$ct \
		"$tmp/src.raw" "$out/compressed-$ct.qcow2"
done

qemu-img create -q -f qcow2 -u -o cluster_size=4K -b base.raw -F raw "$out/backing.qcow2" 64K
qemu-img create -q -f qcow2 -o cluster_size=512 "$out/snapshot.qcow2" 64K
io -c 'write -P 1 0 4k' "$out/snapshot.qcow2"
qemu-img snapshot -c s1 "$out/snapshot.qcow2"
io -c 'write -P 2 0 1k' "$out/snapshot.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=4K "$out/bitmaps.qcow2" 1M
qemu-img bitmap --add -g 64K "$out/bitmaps.qcow2" b0
qemu-img create -q -f qcow2 -o cluster_size=16K,extended_l2=on "$tmp/x.qcow2" 1M
head -c 4096 "$tmp/x.qcow2" >"$out/extended-l2.qcow2"
qemu-img create -q -f qcow2 "$tmp/big.qcow2" 1G
head -c 4096 "$tmp/big.qcow2" >"$out/header-64k.qcow2"

# Corruption cases on a small v3 image: header fields, then L1/L2 entries.
base=$tmp/base.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 "$base" 1M
io -c 'write -P 0x55 0 1k' -c 'write -P 0x66 512k 512' "$base"
l1=$(peek "$base" 40)
l2=$(($(peek "$base" "$l1") & 0xfffffffffe00))
n=0
mutate() {
	local f=$out/bad-$((n++)).qcow2
	cp -- "$base" "$f"
	while (($#)); do
		poke "$f" "$1" "$2" "$3"
		shift 3
	done
}
mutate 0 I 0x12345678
mutate 4 I 1
mutate 4 I 4
mutate 20 I 8
mutate 20 I 22
mutate 100 I 100
mutate 100 I 0x20000
mutate 8 Q 0x20000 16 I 4
mutate 8 Q 0x100 16 I 2000
mutate 72 Q 0x20
mutate 72 Q 0x8
mutate 72 Q 0x2
mutate 72 Q 0x1
mutate 88 Q 0x8001
mutate 96 I 7
mutate 56 I 0
mutate 40 Q $((l1 + 8))
mutate 48 Q 0x208
mutate 60 I 1 64 Q 0x208
mutate 36 I 0
mutate 36 I $((1 << 28))
mutate 40 Q 0x10000000
mutate 48 Q 0x10000000
mutate 0x74 I 0x10000
mutate 0x70 I 0x23852875 0x74 I 24 0x78 I 0 0x88 I 0
mutate 0x70 I 0x23852875 0x74 I 24 0x78 I 1 0x88 Q 0x208 0x90 I 0
mutate 0x70 I 0xe2792aca 0x74 I 20
mutate 100 I 108
mutate 32 I 1
mutate 72 Q 0x4
mutate 72 Q 0x10
mutate 60 I 0x7fffffff
mutate "$l1" Q $(((l2 + 0x10) | 1 << 63))
mutate "$l1" Q $((1 << 63))
mutate "$l1" Q $(((l2 | 1) | 1 << 63))
mutate "$l1" Q $((0x10000000 | 1 << 63))
mutate "$l2" Q $(((l2 + 0x1200) | 1 << 63))
mutate "$l2" Q $(((l2 + 0x1000) | 1 << 62))
mutate "$l2" Q $((l1 | 1 << 63))
mutate "$l2" Q $((0x10000000 | 1 << 63))
mutate "$l2" Q $(((1 << 62) | 0x3ff000000000000))
mutate "$l2" Q 1
ls -l -- "$out" | awk '{ s += $5 } END { print NR - 1, "files,", s, "bytes" }'
