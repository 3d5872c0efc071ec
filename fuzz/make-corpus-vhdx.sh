#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Regenerate fuzz/corpus/vhdx: small VHDX images from qemu-img (and from
# bmirror, if BMIRROR is set), plus single-field corruptions from
# formats.md 3.2 and a pending log entry.  Each seed is stored in the
# target's sparse form ("VHDXSP01", see fuzz-vhdx.c): only the non-zero
# 512-byte sectors, so a 9 MiB image becomes a few KiB.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")"
out=corpus/vhdx
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT

qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M,log_size=1M "$tmp/dyn.vhdx" 4M
qemu-io -f vhdx -c 'write -P 0x11 0 4k' -c 'write -P 0x22 3M 4k' "$tmp/dyn.vhdx"
cp "$tmp/dyn.vhdx" "$out/qemu-dynamic.vhdx"
qemu-img create -q -f vhdx -o subformat=fixed,block_size=1M,block_state_zero=off "$tmp/fixed.vhdx" 2M
cp "$tmp/fixed.vhdx" "$out/qemu-fixed.vhdx"
qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M,block_state_zero=off "$tmp/np.vhdx" 3M
cp "$tmp/np.vhdx" "$out/qemu-not-present.vhdx"
if [[ -n ${BMIRROR:-} ]]; then
	"$BMIRROR" create -f vhdx -o block_size=1M,logical_sector_size=4096 "$out/bm-4k.vhdx" 2M
	# A differencing image with a parent locator: its 'W' variant
	# (below) changes the backing file, to fuzz-image.h's 4 MiB base.
	"$BMIRROR" create -f vhdx -o block_size=1M "$tmp/p.vhdx" 4M
	"$BMIRROR" create -f vhdx -o parent=p.vhdx,block_size=1M "$tmp/c.vhdx" 4M
	cp "$tmp/c.vhdx" "$out/bm-child.vhdx"
fi

# mutate NAME OFFSET PYTHON-STRUCT VALUE [crc OFFSET LENGTH]
mutate() {
	local name=$1 off=$2 fmt=$3 val=$4
	shift 4
	cp "$tmp/dyn.vhdx" "$out/$name.vhdx"
	python3 - "$out/$name.vhdx" "$off" "$fmt" "$val" "$@" <<'PY'
import struct, sys
path, off, fmt, val = sys.argv[1], int(sys.argv[2], 0), sys.argv[3], sys.argv[4]
rest = sys.argv[5:]
def crc32c(b):
    c = 0xffffffff
    for x in b:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ (0x82f63b78 if c & 1 else 0)
    return c ^ 0xffffffff
with open(path, "r+b") as f:
    f.seek(off)
    f.write(struct.pack(fmt, int(val, 0)) if fmt != "raw" else val.encode())
    if rest and rest[0] == "crc":
        o, n = int(rest[1], 0), int(rest[2], 0)
        f.seek(o); b = bytearray(f.read(n)); b[4:8] = b"\0\0\0\0"
        b[4:8] = struct.pack("<I", crc32c(bytes(b)))
        f.seek(o); f.write(b)
PY
}
H1=0x10000 H2=0x20000 R1=0x30000 R2=0x40000
mutate bad-signature 0 raw vhdxfilX
mutate hdr1-crc $((H1 + 4)) '<I' 1
mutate hdr-version $((H1 + 66)) '<H' 2 crc $H1 4096
mutate log-version $((H1 + 64)) '<H' 1 crc $H1 4096
mutate seq-max $((H1 + 8)) '<Q' 0xffffffffffffffff crc $H1 4096
mutate rt1-crc $((R1 + 4)) '<I' 1
mutate rt-count $((R1 + 8)) '<I' 2048 crc $R1 65536
mutate rt-overlap $((R1 + 64)) '<Q' 0x200000 crc $R1 65536
mutate rt-required $((R1 + 44)) '<I' 1 crc $R1 65536
# QEMU's layout: BAT at 2 MiB, metadata at 3 MiB, items from 3 MiB + 64 KiB.
mutate md-signature 0x300000 raw metadatX
mutate block-size-3m 0x310000 '<I' 0x300000
mutate lss-1024 0x310020 '<I' 1024
mutate has-parent 0x310004 '<I' 2
mutate size-16t 0x310008 '<Q' 0x100000000000
mutate bat-past-eof 0x200000 '<Q' 0x40000006
mutate bat-state7 0x200000 '<Q' 0x800007
mutate bat-state4 0x200008 '<Q' 4
mutate bat-offset0 0x200000 '<Q' 6
# A pending log entry (QEMU's dirty log): a crash after the log write.
cp "$tmp/dyn.vhdx" "$tmp/log.vhdx"
qemu-io -f vhdx -c 'write -P 0x33 1M 4k' -c abort "$tmp/log.vhdx" >/dev/null 2>&1 || true
cp "$tmp/log.vhdx" "$out/qemu-pending-log.vhdx"

# Everything into the sparse form.
for f in "$out"/*.vhdx; do
	python3 - "$f" <<'PY'
import struct, sys
path = sys.argv[1]
data = open(path, "rb").read()
out = [b"VHDXSP01", struct.pack("<Q", len(data))]
i, S = 0, 512
while i < len(data):
    if data[i:i + S].strip(b"\0"):
        j = i
        while j < len(data) and data[j:j + S].strip(b"\0"):
            j += S
        out.append(struct.pack("<QI", i, min(j, len(data)) - i) + data[i:j])
        i = j
    else:
        i += S
open(path[:-5] + ".seed", "wb").write(b"".join(out))
PY
	rm -- "$f"
done
# The last byte picks the mode (fuzz-image.h): a trailing byte after
# the last record is ignored by the layout.
if [[ -f $out/bm-child.seed ]]; then
	{ cat "$out/bm-child.seed"; printf W; } >"$out/bm-child-W.seed"
fi
ls -la "$out"
