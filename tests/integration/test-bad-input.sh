#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Integration test for bad input to bmirror. Every case must give the right
# exit status (1 = failure, 2 = bad usage; verify: 2 = error), exactly one
# line on stderr naming the offending file (or argument) and the problem, leave
# nothing behind, and leave the source (and any existing file) unchanged:
#   - missing source / missing destination directory (copy, info, verify, create)
#   - no permission (run as user nobody on a root-owned 0600 file; unwritable
#     destination directory)
#   - a directory as source, or as destination
#   - bad size / count strings (--request-size, --requests, create SIZE)
#   - full destination (2 MiB tmpfs): "No space left on device", no partial
#     file, source unchanged; a sparse image still fits
#   - source and destination the same file (same path, other spelling,
#     symlink, hard link), with and without --overwrite
#   - unknown format names, a known but unsupported output format, a qcow2
#     magic without -f for verify
#   - usage errors: no subcommand, unknown subcommand, unknown options, missing
#     or extra operands, an option missing its argument
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires python3 sha256sum truncate numfmt dd head stat awk cmp

# state DIR: one line per entry below DIR (type, size, checksum) to detect
# left-over or modified files.
state() {
	local d=$1
	(cd -- "$d" && find . -mindepth 1 -printf '%p %y %s\n' | sort) | while read -r p y s; do
		if [[ $y == f ]]; then
			echo "$p $y $s $(checksum "$d/$p")"
		else
			echo "$p $y"
		fi
	done
}

# unchanged DIR BEFORE WHAT: compare state DIR with BEFORE.
unchanged() {
	local now
	now=$(state "$1")
	if [[ $now != "$2" ]]; then
		printf '  before:\n%s\n  after:\n%s\n' "$2" "$now" >&2
		fail "$3: files below $1 were created, removed or modified"
	fi
}

# expect_usage_error CMD...: exit 2 and something on stderr (no line limit).
expect_usage_error() {
	run "$@"
	if ((RUN_RC != 2)) || ! grep -q '[^[:space:]]' "$RUN_ERR"; then
		show_run "$@"
		fail "expected exit status 2 and a message on stderr from: $(printf '%q ' "$@")"
	fi
}

as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"; }

W=$T/work # everything a case may touch lives here
mkdir -p -- "$W/out"
make_dense_image "$W/src.img" 4M
make_dense_image "$W/dense8M.img" 8M
make_sparse_image "$W/sparse64M.img" 64M
make_mixed_image "$W/mixed.img"
mkdir -p -- "$W/adir"

# ---------------------------------------------------------------------------
# Missing files
before=$(state "$W")
expect_fail_with --names "$W/nope.img" 1 'no such file|not found|does not exist' \
	"$BMIRROR" copy "$W/nope.img" "$W/out/dst.img"
unchanged "$W" "$before" "copy of a missing source"
pass "copy: missing source: exit 1, one line naming it, nothing created"

expect_fail_with --names "$W/nodir/dst.img" 1 'no such file|not found|does not exist' \
	"$BMIRROR" copy "$W/src.img" "$W/nodir/dst.img"
unchanged "$W" "$before" "copy into a missing directory"
pass "copy: destination in a missing directory: exit 1, one line naming it"

expect_fail_with --names "$W/nope.img" 1 'no such file|not found|does not exist' \
	"$BMIRROR" info "$W/nope.img"
expect_fail_with --names "$W/nope.img" 1 'no such file|not found|does not exist' \
	"$BMIRROR" info --json "$W/nope.img"
pass "info: missing image: exit 1, one line naming it"

expect_fail_with --names "$W/nope.img" 2 'no such file|not found|does not exist' \
	"$BMIRROR" verify "$W/src.img" "$W/nope.img"
pass "verify: missing image: exit 2, one line naming it"

expect_fail_with --names "$W/nodir/new.img" 1 'no such file|not found|does not exist' \
	"$BMIRROR" create -f raw "$W/nodir/new.img" 1M
unchanged "$W" "$before" "create in a missing directory"
pass "create: missing directory: exit 1, one line naming the image"

# ---------------------------------------------------------------------------
# No permission (as user nobody)
P=$T/perm
mkdir -p -- "$P/out" "$P/rootonly"
chmod 0755 -- "$T" "$P" "$P/rootonly"
chown 65534:65534 -- "$P/out"
make_dense_image "$P/public.img" 1M
chmod 0644 -- "$P/public.img"
make_dense_image "$P/secret.img" 1M
chmod 0600 -- "$P/secret.img"
perm_ok=1
if [[ $(id -u) != 0 ]]; then
	skip_subcase "permission checks need root (to switch to user nobody)"
	perm_ok=0
elif ! command -v setpriv >/dev/null; then
	skip_subcase "permission checks need setpriv"
	perm_ok=0
else
	run as_nobody "$BMIRROR" info "$P/public.img"
	if ((RUN_RC != 0)); then
		if ((RUN_RC == 126 || RUN_RC == 127)) || grep -q 'error while loading shared libraries' "$RUN_ERR" ||
			! as_nobody test -x "$BMIRROR"; then
			skip_subcase "user nobody cannot run $BMIRROR or load its libraries in this checkout: $(head -n1 "$RUN_ERR")"
			perm_ok=0
		else
			show_run as_nobody "$BMIRROR" info "$P/public.img"
			fail "bmirror info on a world-readable image fails when run as nobody"
		fi
	fi
fi
if ((perm_ok)); then
	pbefore=$(state "$P")
	expect_fail_with --names "$P/secret.img" 1 'permission denied|not permitted|access' \
		as_nobody "$BMIRROR" copy "$P/secret.img" "$P/out/dst.img"
	unchanged "$P" "$pbefore" "copy of an unreadable source"
	pass "copy as nobody of a root-only 0600 source: exit 1, one line naming it, nothing created"

	expect_fail_with --names "$P/secret.img" 1 'permission denied|not permitted|access' \
		as_nobody "$BMIRROR" info "$P/secret.img"
	pass "info as nobody on a root-only 0600 image: exit 1, one line naming it"

	expect_fail_with --names "$P/secret.img" 2 'permission denied|not permitted|access' \
		as_nobody "$BMIRROR" verify "$P/public.img" "$P/secret.img"
	pass "verify as nobody with a root-only 0600 image: exit 2, one line naming it"

	expect_fail_with --names "$P/rootonly/dst.img" 1 'permission denied|not permitted|access' \
		as_nobody "$BMIRROR" copy "$P/public.img" "$P/rootonly/dst.img"
	unchanged "$P" "$pbefore" "copy into an unwritable directory"
	pass "copy as nobody into a directory it cannot write: exit 1, one line naming the destination"

	expect_fail_with --names "$P/rootonly/new.img" 1 'permission denied|not permitted|access' \
		as_nobody "$BMIRROR" create -f raw "$P/rootonly/new.img" 1M
	unchanged "$P" "$pbefore" "create in an unwritable directory"
	pass "create as nobody in a directory it cannot write: exit 1, one line naming the image"
fi

# ---------------------------------------------------------------------------
# Directories
before=$(state "$W")
expect_fail_with --names "$W/adir" 1 'directory' "$BMIRROR" copy "$W/adir" "$W/out/dst.img"
unchanged "$W" "$before" "copy of a directory"
pass "copy: directory as source: exit 1, one line naming it, nothing created"
expect_fail_with --names "$W/adir" 1 'directory' "$BMIRROR" info "$W/adir"
pass "info: directory: exit 1, one line naming it"
expect_fail_with --names "$W/adir" 2 'directory' "$BMIRROR" verify "$W/adir" "$W/src.img"
pass "verify: directory: exit 2, one line naming it"
expect_fail_with --names "$W/adir" 1 '.' "$BMIRROR" copy "$W/src.img" "$W/adir"
expect_fail_with --names "$W/adir" 1 '.' "$BMIRROR" copy --overwrite "$W/src.img" "$W/adir"
unchanged "$W" "$before" "copy onto a directory"
pass "copy: directory as destination (with and without --overwrite): exit 1, directory untouched"
expect_fail_with --names "$W/adir" 1 '.' "$BMIRROR" create -f raw --overwrite "$W/adir" 1M
unchanged "$W" "$before" "create over a directory"
pass "create --overwrite on a directory: exit 1, directory untouched"

# ---------------------------------------------------------------------------
# Bad sizes and counts
before=$(state "$W")
for bad in abc 10X -1 '' 1.5.5 99999999999999999999; do
	names=(--names "$bad")
	[[ -n $bad ]] || names=(--names size)
	expect_fail_with "${names[@]}" 2 '.' "$BMIRROR" copy --request-size "$bad" "$W/src.img" "$W/out/dst.img"
done
pass "copy --request-size with bad sizes (abc 10X -1 '' 1.5.5 99999999999999999999): exit 2, one line"
for bad in abc -1 '' 3x 99999999999999999999; do
	names=(--names "$bad")
	[[ -n $bad ]] || names=(--names request)
	expect_fail_with "${names[@]}" 2 '.' "$BMIRROR" copy --requests "$bad" "$W/src.img" "$W/out/dst.img"
done
pass "copy --requests with bad numbers (abc -1 '' 3x 99999999999999999999): exit 2, one line"
for bad in abc 0 -1 '' 5Q; do
	names=(--names "$bad")
	[[ -n $bad ]] || names=(--names speed)
	expect_fail_with "${names[@]}" 2 '.' "$BMIRROR" copy --speed "$bad" "$W/src.img" "$W/out/dst.img"
done
pass "copy --speed with bad rates (abc 0 -1 '' 5Q): exit 2, one line"
expect_fail_with --names "$W/out/new.img" --names 12Q 2 '.' "$BMIRROR" create -f raw "$W/out/new.img" 12Q
unchanged "$W" "$before" "bad sizes"
pass "create with size 12Q: exit 2, one line, nothing created"

# ---------------------------------------------------------------------------
# Full destination
full_ok=1
if [[ $(id -u) != 0 ]]; then
	skip_subcase "full-destination checks need root (mount -t tmpfs)"
	full_ok=0
else
	mkdir -p -- "$T/full"
	if ! mount -t tmpfs -o size=2M tmpfs "$T/full" 2>"$T/mount.err"; then
		skip_subcase "cannot mount a tmpfs: $(cat "$T/mount.err")"
		full_ok=0
	fi
fi
if ((full_ok)); then
	F=$T/full
	src_sum=$(checksum "$W/dense8M.img")
	for opt in "" --allocate --direct; do
		args=()
		[[ -n $opt ]] && args=("$opt")
		if [[ $opt == --direct ]]; then
			# tmpfs may not support O_DIRECT (before Linux 6.6); then any clean
			# failure naming the destination is fine.
			pattern='.'
		else
			pattern='no space|not enough space|insufficient space|space left'
		fi
		expect_fail_with --names "$F/dst.img" 1 "$pattern" \
			"$BMIRROR" copy "${args[@]+"${args[@]}"}" "$W/dense8M.img" "$F/dst.img"
		[[ -z $(ls -A -- "$F") ]] || { ls -la -- "$F" >&2; fail "copy ${opt:+$opt }into a full file system left files behind"; }
		[[ $(checksum "$W/dense8M.img") == "$src_sum" ]] || fail "source changed by a failed copy"
		pass "copy ${opt:+$opt }of 8 MiB into a 2 MiB tmpfs: exit 1, '$(head -c 200 "$RUN_ERR" | tr -d '\n')', no partial file, source unchanged"
	done
	expect_fail_with --names "$F/dst.img" 1 'no space|not enough space|insufficient space|space left' \
		"$BMIRROR" copy "$W/mixed.img" "$F/dst.img"
	[[ -z $(ls -A -- "$F") ]] || { ls -la -- "$F" >&2; fail "copy of the mixed image into a full file system left files behind"; }
	pass "copy of a mixed image (6 MiB of data) into a 2 MiB tmpfs: exit 1, no partial file"

	run_ok "$BMIRROR" copy "$W/sparse64M.img" "$F/sparse.img"
	cmp -- "$W/sparse64M.img" "$F/sparse.img" || fail "sparse copy onto tmpfs differs"
	rm -f -- "$F/sparse.img"
	pass "copy of a 64 MiB sparse image into a 2 MiB tmpfs: succeeds (holes take no space)"
	umount -- "$F" || umount -l -- "$F"
fi

# ---------------------------------------------------------------------------
# Source and destination the same file
S=$T/same
mkdir -p -- "$S/sub"
make_mixed_image "$S/a.img"
ln -s -- "$S/a.img" "$S/link.img"
ln -s -- a.img "$S/rellink.img"
ln -- "$S/a.img" "$S/hard.img"
sbefore=$(state "$S")
expect_fail_with --names "$S/a.img" 1 '.' "$BMIRROR" copy "$S/a.img" "$S/a.img"
unchanged "$S" "$sbefore" "copy A A"
pass "copy A A: refused (exit 1), file unchanged"
expect_fail_with --names "$S/a.img" 1 'same|identical|itself' "$BMIRROR" copy --overwrite "$S/a.img" "$S/a.img"
unchanged "$S" "$sbefore" "copy --overwrite A A"
pass "copy --overwrite A A: refused (exit 1), file unchanged"
expect_fail_with --names "$S/sub/../a.img" --names "$S/a.img" 1 'same|identical|itself' \
	"$BMIRROR" copy --overwrite "$S/a.img" "$S/sub/../a.img"
unchanged "$S" "$sbefore" "copy --overwrite A sub/../A"
pass "copy --overwrite A sub/../A: refused (exit 1), file unchanged"
for other in link.img rellink.img hard.img; do
	expect_fail_with --names "$S/a.img" --names "$S/$other" 1 'same|identical|itself' \
		"$BMIRROR" copy --overwrite "$S/a.img" "$S/$other"
	unchanged "$S" "$sbefore" "copy --overwrite a.img $other"
	expect_fail_with --names "$S/a.img" --names "$S/$other" 1 'same|identical|itself' \
		"$BMIRROR" copy --overwrite "$S/$other" "$S/a.img"
	unchanged "$S" "$sbefore" "copy --overwrite $other a.img"
	expect_fail_with --names "$S/a.img" --names "$S/$other" 1 '.' \
		"$BMIRROR" copy "$S/a.img" "$S/$other"
	unchanged "$S" "$sbefore" "copy a.img $other"
	pass "copy (--overwrite) between a.img and its $other, both directions: refused (exit 1), files unchanged"
done
[[ -L $S/link.img && -L $S/rellink.img ]] || fail "symlinks were replaced"

# ---------------------------------------------------------------------------
# Formats
before=$(state "$W")
expect_fail_with --names bogus 2 '.' "$BMIRROR" copy -f bogus "$W/src.img" "$W/out/dst.img"
expect_fail_with --names bogus 2 '.' "$BMIRROR" copy -O bogus "$W/src.img" "$W/out/dst.img"
expect_fail_with --names bogus 2 '.' "$BMIRROR" info -f bogus "$W/src.img"
expect_fail_with --names bogus 2 '.' "$BMIRROR" verify -f bogus "$W/src.img" "$W/src.img"
expect_fail_with --names bogus 2 '.' "$BMIRROR" verify -F bogus "$W/src.img" "$W/src.img"
expect_fail_with --names bogus 2 '.' "$BMIRROR" create -f bogus "$W/out/new.img" 1M
unchanged "$W" "$before" "unknown format names"
pass "unknown format name (copy -f/-O, info -f, verify -f/-F, create -f): exit 2, one line naming it, nothing created"

# Known but (for now) unsupported output format: a clean failure, or a real qcow2.
for fmt in qcow2 vhdx; do
	rm -f -- "$W/out/dst.$fmt"
	run "$BMIRROR" copy -O "$fmt" "$W/src.img" "$W/out/dst.$fmt"
	if ((RUN_RC == 0)); then
		if command -v qemu-img >/dev/null; then
			qemu-img info --output=json "$W/out/dst.$fmt" | grep -q "\"format\": \"$fmt\"" ||
				fail "copy -O $fmt succeeded but did not write a $fmt image"
		fi
		rm -f -- "$W/out/dst.$fmt"
		pass "copy -O $fmt: writes a $fmt image"
	else
		expect_fail_with --names "$fmt" --names "$W/out/dst.$fmt" '1|2' '.' \
			"$BMIRROR" copy -O "$fmt" "$W/src.img" "$W/out/dst.$fmt"
		unchanged "$W" "$before" "copy -O $fmt"
		pass "copy -O $fmt: refused (exit $RUN_RC), one line, nothing created"
	fi
done

make_dense_image "$W/magic.img" 1M
printf 'QFI\xfb' | dd of="$W/magic.img" conv=notrunc status=none
run "$BMIRROR" verify "$W/magic.img" "$W/magic.img"
((RUN_RC == 2)) || { show_run "$BMIRROR" verify "$W/magic.img" "$W/magic.img"; fail "verify without -f on a qcow2-magic file: expected exit 2 (error), got $RUN_RC"; }
expect_fail_with --names "$W/magic.img" 2 '.' "$BMIRROR" verify "$W/magic.img" "$W/magic.img"
run_ok "$BMIRROR" verify -f raw -F raw "$W/magic.img" "$W/magic.img"
pass "verify without -f on a file with a qcow2 magic: exit 2; with -f raw -F raw: identical"

# ---------------------------------------------------------------------------
# Usage errors
before=$(state "$W")
expect_usage_error "$BMIRROR"
pass "no subcommand: exit 2"
expect_fail_with --names frobnicate 2 '.' "$BMIRROR" frobnicate
expect_fail_with --names frobnicate 2 '.' "$BMIRROR" frobnicate "$W/src.img"
pass "unknown subcommand: exit 2, one line naming it"
expect_fail_with --names bogus 2 '.' "$BMIRROR" --bogus
expect_fail_with --names bogus 2 '.' "$BMIRROR" copy --bogus "$W/src.img" "$W/out/dst.img"
expect_fail_with --names bogus 2 '.' "$BMIRROR" copy "$W/src.img" "$W/out/dst.img" --bogus
expect_fail_with --names bogus 2 '.' "$BMIRROR" info --bogus "$W/src.img"
expect_fail_with --names bogus 2 '.' "$BMIRROR" verify --bogus "$W/src.img" "$W/src.img"
expect_fail_with --names bogus 2 '.' "$BMIRROR" create --bogus -f raw "$W/out/new.img" 1M
expect_fail_with --names "-Z" --names "'Z'" 2 '.' "$BMIRROR" copy -Z "$W/src.img" "$W/out/dst.img"
unchanged "$W" "$before" "unknown options"
pass "unknown options (global, copy, info, verify, create; long and short): exit 2, one line naming it, nothing created"

expect_fail_with 2 '.' "$BMIRROR" copy
expect_fail_with 2 '.' "$BMIRROR" copy "$W/src.img"
expect_fail_with 2 '.' "$BMIRROR" info
expect_fail_with 2 '.' "$BMIRROR" verify
expect_fail_with 2 '.' "$BMIRROR" verify "$W/src.img"
expect_fail_with 2 '.' "$BMIRROR" create -f raw
expect_fail_with 2 '.' "$BMIRROR" create -f raw "$W/out/new.img"
unchanged "$W" "$before" "missing operands"
pass "missing operands (copy, info, verify, create): exit 2, one line, nothing created"

expect_fail_with 2 '.' "$BMIRROR" copy "$W/src.img" "$W/out/dst.img" "$W/out/dst2.img"
expect_fail_with 2 '.' "$BMIRROR" info "$W/src.img" "$W/src.img"
expect_fail_with 2 '.' "$BMIRROR" verify "$W/src.img" "$W/src.img" "$W/src.img"
expect_fail_with 2 '.' "$BMIRROR" create -f raw "$W/out/new.img" 1M 2M
unchanged "$W" "$before" "extra operands"
pass "extra operands (copy, info, verify, create): exit 2, one line, nothing created"

expect_fail_with --names request-size 2 '.' "$BMIRROR" copy "$W/src.img" "$W/out/dst.img" --request-size
expect_fail_with 2 '.' "$BMIRROR" info "$W/src.img" -f
unchanged "$W" "$before" "option without argument"
pass "option missing its argument: exit 2, one line, nothing created"

info "all bad-input checks passed"
