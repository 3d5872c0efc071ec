#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The main job, end to end on a fresh Debian 12 machine: install what is
# missing, build, generate a sparse 2 GiB disk (random data in three
# quarters of its 1 MiB extents), copy it with a progress bar, and verify
# the copy against the original.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

bm_install_missing "${BM_BUILD_PACKAGES[@]}" python3
bm_build build
bmirror=$PWD/build/tools/bmirror

dir=$(mktemp -d "${TMPDIR:-/var/tmp}/bmirror-demo.XXXXXX")
trap 'rm -rf "$dir"' EXIT

echo "Generating a 2 GiB sparse disk in $dir ..."
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
"$bmirror" info "$dir/disk.raw"
echo
"$bmirror" copy --progress "$dir/disk.raw" "$dir/copy.raw"
"$bmirror" info "$dir/copy.raw"
echo
"$bmirror" verify --progress "$dir/disk.raw" "$dir/copy.raw"
