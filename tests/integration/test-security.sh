#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The control socket of `bmirror serve` facing clients it must not trust
# (SECURITY.md, docs/control.md):
#   - the socket is created 0600, owned by the server's user;
#   - another user (nobody) is refused: by the file's mode, and, when the
#     operator loosened the mode, by the server's SO_PEERCRED check (the
#     connection is closed unanswered and the server says so on stderr);
#   - members of the wrong type are refused before anything runs;
#   - a move's destination must be an absolute path; with --allow-dir it
#     must be inside an allowed directory after following symlinks and
#     "..", must not itself be a symlink, and an NBD URI may not carry a
#     query (which can name local files); a move inside is done normally;
#   - --control never replaces a file that is not a socket, nor a live
#     server's socket.
# The NBD side (bounds, limits, max_clients, TLS-PSK refusing plain and
# wrong-key clients) is tested in tests/unit/test-server.c.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires python3 setpriv stat

# ctl SOCKET JSON: send one command, print the one answer line (empty if
# the server hung up without answering).  Exit 3 if connecting failed.
ctl() {
	python3 - "$@" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect: %s" % e.strerror)
    sys.exit(3)
s.settimeout(20)
buf = b""
try:
    s.sendall(sys.argv[2].encode() + b"\n")
except (BrokenPipeError, ConnectionResetError):
    buf = b"\n"  # hung up on us before we spoke
while b"\n" not in buf:
    try:
        d = s.recv(4096)
    except ConnectionResetError:
        d = b""
    if not d:
        break
    buf += d
print(buf.split(b"\n")[0].decode())
PY
}

# expect_errno SOCKET JSON ERRNO WHAT
expect_errno() {
	local out
	out=$(ctl "$1" "$2") || true
	python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d.get("error",{}).get("errno")==int(sys.argv[2]) else 1)' \
		"$out" "$3" 2>/dev/null || fail "$4: expected errno $3, got: $out"
	pass "$4"
}

truncate -s 8M "$T/disk.raw"
head -c 1M /dev/urandom | dd of="$T/disk.raw" conv=notrunc status=none
mkdir "$T/ok" "$T/other"

# ---- the socket's mode and owner -----------------------------------------
start_serve "$T/disk.raw"
[[ $(stat -c '%a %u' "$T/ctl.sock") == "600 $(id -u)" ]] ||
	fail "control socket is $(stat -c '%a %u' "$T/ctl.sock")"
[[ $(stat -c '%a' "$T/nbd.sock") == 600 ]] || fail "NBD socket is not 0600"
pass "control and NBD sockets are 0600, owned by us"

run_ok "$BMIRROR" status --control "$T/ctl.sock" --json
pass "our own user is served"

# ---- other users -----------------------------------------------------------
if [[ $(id -u) == 0 ]] && id nobody >/dev/null 2>&1; then
	as_nobody=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups)
	chmod 0711 "$T"
	out=$("${as_nobody[@]}" bash -c "$(declare -f ctl); ctl '$T/ctl.sock' '{\"cmd\":\"query\"}'" 2>&1) && rc=0 || rc=$?
	((rc == 3)) && [[ $out == *"Permission denied"* ]] ||
		fail "nobody reached the 0600 control socket: rc=$rc: $out"
	pass "nobody cannot connect to the 0600 socket"

	# The operator loosens the mode: the peer check still refuses.
	chmod 0666 "$T/ctl.sock"
	out=$("${as_nobody[@]}" bash -c "$(declare -f ctl); ctl '$T/ctl.sock' '{\"cmd\":\"quit\"}'" 2>&1) && rc=0 || rc=$?
	((rc == 0)) && [[ -z $out ]] ||
		fail "nobody was answered on a 0666 control socket: rc=$rc: $out"
	kill -0 "$SERVE_PID" || fail "the server quit on nobody's command"
	grep -q "refused a control client of uid $(id -u nobody)" "$T/serve.err" ||
		fail "no message about the refused client: $(cat "$T/serve.err")"
	run_ok "$BMIRROR" status --control "$T/ctl.sock"
	pass "SO_PEERCRED refuses another user even on a 0666 socket"
	chmod 0600 "$T/ctl.sock"
	chmod 0700 "$T"
else
	skip_subcase "connecting as another user needs root and user nobody"
fi

# ---- members of the wrong type, paths ---------------------------------------
expect_errno "$T/ctl.sock" '{"cmd":7}' 22 'a "cmd" that is not a string is refused'
expect_errno "$T/ctl.sock" '{"cmd":"move","to":"/x","speed":-1}' 22 'a negative speed is refused'
expect_errno "$T/ctl.sock" '{"cmd":"move","to":"/x","granularity":"64K"}' 22 'a granularity string is refused'
expect_errno "$T/ctl.sock" '{"cmd":"move","to":{"a":1}}' 22 'a "to" object is refused'
expect_errno "$T/ctl.sock" '{"cmd":"move","to":"rel.raw","create":true}' 22 'a relative destination is refused'
[[ ! -e rel.raw ]] || fail "rel.raw was created"
stop_serve

# ---- --allow-dir --------------------------------------------------------------
ln -s "$T/other" "$T/ok/sub"
ln -s "$T/other/target.raw" "$T/ok/link.raw"
"$BMIRROR" serve --nbd "unix:$T/nbd.sock" --control "$T/ctl.sock" \
	--allow-dir "$T/ok" "$T/disk.raw" 2>"$T/serve.err" &
SERVE_PID=$!
wait_for_socket "$T/ctl.sock"
mv1() { printf '{"cmd":"move","to":"%s","create":true}' "$1"; }
expect_errno "$T/ctl.sock" "$(mv1 "$T/other/x.raw")" 1 "a destination outside --allow-dir is refused"
expect_errno "$T/ctl.sock" "$(mv1 "$T/ok/../other/x.raw")" 1 '".." out of --allow-dir is refused'
expect_errno "$T/ctl.sock" "$(mv1 "$T/ok/sub/x.raw")" 1 "a symlinked directory out of --allow-dir is refused"
expect_errno "$T/ctl.sock" "$(mv1 "$T/ok/link.raw")" 40 "a symlink as the destination is refused"
expect_errno "$T/ctl.sock" "$(mv1 "$T/ok/")" 22 "a directory as the destination is refused"
expect_errno "$T/ctl.sock" '{"cmd":"move","to":"nbd+unix:///?socket=/tmp/x.sock"}' 1 \
	"an NBD URI with a query is refused under --allow-dir"
[[ -z $(ls "$T/other") ]] || fail "something was created in $T/other: $(ls "$T/other")"
run_ok "$BMIRROR" move --control "$T/ctl.sock" --to "$T/ok/dest.raw"
cmp "$T/disk.raw" "$T/ok/dest.raw" || fail "the allowed move copied wrong data"
pass "a move into --allow-dir works"
stop_serve

# ---- --control never replaces what is not a stale socket ---------------------
echo precious >"$T/file"
expect_fail_with 1 "not a socket" "$BMIRROR" serve --nbd "unix:$T/nbd2.sock" \
	--control "$T/file" "$T/disk.raw"
[[ $(cat "$T/file") == precious ]] || fail "--control replaced a file"
pass "--control refuses to replace a regular file"

start_serve "$T/disk.raw"
expect_fail_with 1 "listening" "$BMIRROR" serve --nbd "unix:$T/nbd2.sock" \
	--control "$T/ctl.sock" "$T/disk.raw"
run_ok "$BMIRROR" status --control "$T/ctl.sock"
pass "--control refuses a live server's socket"
stop_serve

# ---- a move never writes the disk's own chain or its own export -------------
# (issue 15, finding 4): the served overlay's backing file is shared by
# other overlays; the disk's own NBD export would loop the disk into itself.
mkdir "$T/chain"
truncate -s 8M "$T/chain/base.raw"
head -c 1M /dev/urandom | dd of="$T/chain/base.raw" conv=notrunc status=none
qemu-img create -q -f qcow2 -b base.raw -F raw "$T/chain/top.qcow2" 8M
base_sum=$(checksum "$T/chain/base.raw")
start_serve "$T/chain/top.qcow2"
expect_fail_with 1 "backing file of the disk" "$BMIRROR" move \
	--control "$T/ctl.sock" --to "$T/chain/base.raw" -O raw
ln "$T/chain/base.raw" "$T/chain/hardlink.raw"
expect_fail_with 1 "backing file of the disk" "$BMIRROR" move \
	--control "$T/ctl.sock" --to "$T/chain/hardlink.raw" -O raw
[[ $(checksum "$T/chain/base.raw") == "$base_sum" ]] ||
	fail "the shared base changed"
pass "a move onto the served overlay's backing file (or a hard link to it) is refused"
expect_fail_with 1 "own NBD export" "$BMIRROR" move --control "$T/ctl.sock" \
	--to "nbd+unix:///?socket=$T/nbd.sock"
ln -s "$T/nbd.sock" "$T/nbd-link.sock"
expect_fail_with 1 "own NBD export" "$BMIRROR" move --control "$T/ctl.sock" \
	--to "nbd+unix:///?socket=$T/nbd-link.sock"
run_ok "$BMIRROR" status --control "$T/ctl.sock"
pass "a move onto the disk's own Unix-socket export is refused"
stop_serve

port=$((20000 + RANDOM % 20000))
"$BMIRROR" serve --nbd "tcp:127.0.0.1:$port" --control "$T/ctl.sock" \
	"$T/disk.raw" 2>"$T/serve.err" &
SERVE_PID=$!
wait_for_socket "$T/ctl.sock"
for uri in "nbd://127.0.0.1:$port/" "nbd://localhost:$port" \
	   "nbd://127.0.0.1:$port"; do
	expect_fail_with 1 "own NBD export" "$BMIRROR" move \
		--control "$T/ctl.sock" --to "$uri"
done
pass "a move onto the disk's own TCP export is refused"
stop_serve
