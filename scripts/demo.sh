#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The main job, end to end on a fresh Debian 12 machine: install what is
# missing, build, generate a 2 GiB disk (random data in three quarters of
# its 1 MiB extents), serve it over NBD with `bmirror serve`, run a guest
# writer against it (fio's nbd engine, 4 KiB random writes with crc32c
# verify headers), move the disk live to a new file with a progress bar,
# and check that the guest's data is all on the moved disk.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

bm_install_missing "${BM_BUILD_PACKAGES[@]}" python3 fio
bm_build build
bmirror=$PWD/build/tools/bmirror

dir=$(mktemp -d "${TMPDIR:-/var/tmp}/bmirror-demo.XXXXXX")
serve_pid=
cleanup() {
	[ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
	rm -rf "$dir"
}
trap cleanup EXIT

wait_for() {
	for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
	echo "timed out waiting for $1" >&2
	exit 1
}

echo "== Generating a 2 GiB disk in $dir"
python3 - "$dir/disk.raw" <<'PY'
import os, random, sys
MiB = 1 << 20
rnd = random.Random(1)
with open(sys.argv[1], 'wb') as f:
    f.truncate(2048 * MiB)
    for i in range(2048):
        if rnd.random() < 0.75:
            f.seek(i * MiB)
            f.write(os.urandom(MiB))
PY
ln -s "$dir/disk.raw" "$dir/vm-disk"
"$bmirror" info "$dir/disk.raw"

echo
echo "== Serving it over NBD (the VM's config names $dir/vm-disk)"
"$bmirror" serve --nbd "unix:$dir/nbd.sock" --control "$dir/ctl.sock" \
	--link "$dir/vm-disk" &
serve_pid=$!
wait_for "$dir/nbd.sock"
wait_for "$dir/ctl.sock"
uri="nbd+unix:///?socket=$dir/nbd.sock"

echo "== Starting the guest: fio writing 4 KiB blocks through NBD"
guest=(fio --name=guest --ioengine=nbd "--uri=$uri" --rw=randwrite --bs=4k
	--iodepth=16 --size=256M --verify=crc32c --randseed=7)
"${guest[@]}" --do_verify=0 --rate_iops=4000 --output="$dir/fio.out" &
fio_pid=$!
sleep 1

echo "== Moving the disk live to $dir/moved.raw"
"$bmirror" move --control "$dir/ctl.sock" --to "$dir/moved.raw" --mode active --progress

wait "$fio_pid"
echo
echo "== After the move"
"$bmirror" status --control "$dir/ctl.sock"
echo "vm-disk -> $(readlink "$dir/vm-disk")"
echo
echo "== Checking every block the guest wrote, through the moved disk"
"${guest[@]}" --verify_only --output="$dir/fio-verify.out"
grep -E "err= *0" "$dir/fio-verify.out" >/dev/null && echo "fio verify: all blocks present and intact"
