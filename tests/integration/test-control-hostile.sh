#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# `bmirror serve`'s control socket against clients that are careless or
# hostile (docs/control.md, SECURITY.md); the checks are in
# control-hostile.py, each bounded in time:
#   - destinations under --allow-dir are classified by the library's own
#     URI rule: DIR/x://../../outside.raw (with a directory named x:) is a
#     path and is refused, nothing is created outside; a relative x://...
#     is refused; an existing destination with another hard link and a
#     dangling symlink are refused; NBD destinations need --allow-nbd (a
#     host, or unix:SOCKET with only a socket= query); an allowed NBD
#     socket served by another bmirror takes a whole move;
#   - a client that sends thousands of queries and never reads does not
#     hold up the others (answers within a second), moves started by
#     another client, a move it started itself (events, automatic pivot),
#     the next move (no EBUSY from a lost COMPLETED) or SIGTERM;
#   - two flooding clients do not starve a third;
#   - clients gone mid-line or before their answer, half-closed clients
#     (answered, then EOF), over-long lines, 50 clients at once;
#   - consistency-group commands with bad members, for unknown groups,
#     or from a client that does not hold the group are refused; a
#     holder that goes away lets the disk go at once, whatever its lease.
# ONLY=destinations|unread|flood|careless|group runs one of them.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/functions.sh"

requires python3 timeout

timeout -k 5 240 python3 "$INTEG_DIR/control-hostile.py" "$BMIRROR" "$T" ||
	fail "see the FAIL lines above"
