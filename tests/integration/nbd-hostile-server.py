#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A deliberately lying NBD server, for tests/integration/test-nbd-hostile.sh.

Usage: nbd-hostile-server.py SOCKET MODE SIZE LOG

Serves one export of SIZE bytes (reads return a pattern, writes are
checked and kept in memory) on the Unix socket SOCKET, one thread per
connection, speaking fixed newstyle, structured replies and
base:allocation like a real server, except where MODE says to lie:

  honest           no lie (the control case)
  silent           accept, then never send a byte
  silent-after-go  finish the handshake, then never answer a command
  size-huge        advertise 2^64 - 1 bytes
  size-odd         advertise SIZE + 1 bytes with a 512-byte minimum block
  size-flip        advertise SIZE, then twice SIZE on later connections
  bs-beyond        block status: one extent longer than asked and the export
  bs-zero          block status: a zero-length extent, nothing else
  bs-offset        block status: extents for somewhere else (wrong context id)
  bs-many          block status: far more descriptors than asked for
  read-beyond      reads: a data chunk placed past what was asked
  read-short       reads: a chunk covering half, then DONE
  pattern-file     not a server: write the pattern reads return to SOCKET

Every request a client sends past the size that connection was told is
logged as "OUTSIDE ..." in LOG (the test fails on it); every connection
and command is logged too.  Writes land in LOG.data.  Exits when the
parent test kills it.
"""
import os
import socket
import struct
import sys
import threading

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x3E889045565A9
REQMAGIC = 0x25609513
SIMPLEMAGIC = 0x67446698
CHUNKMAGIC = 0x668E33EF

sock_path, mode, size, log_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lock = threading.Lock()
connections = [0]


def log(msg):
    with lock:
        with open(log_path, "a") as f:
            f.write(msg + "\n")


def recv_all(c, n):
    b = b""
    while len(b) < n:
        r = c.recv(n - len(b))
        if not r:
            raise EOFError
        b += r
    return b


def opt_reply(c, opt, typ, payload=b""):
    c.sendall(struct.pack(">QIII", REPMAGIC, opt, typ, len(payload)) + payload)


def chunk(c, flags, typ, cookie, payload):
    c.sendall(struct.pack(">IHHQI", CHUNKMAGIC, flags, typ, cookie, len(payload)) + payload)


def pattern(offset, length):
    """Byte i of the export is i * 7 % 251 (never all zeroes)."""
    return bytes((offset + i) * 7 % 251 for i in range(length))


if mode == "pattern-file":
    # Not a server: write SIZE bytes of the pattern to SOCKET (a file).
    with open(sock_path, "wb") as f:
        f.write(pattern(0, size))
    sys.exit(0)


def serve(c, n):
    told = size
    if mode == "size-huge":
        told = 2**64 - 1
    elif mode == "size-odd":
        told = size + 1
    elif mode == "size-flip" and n > 1:
        told = 2 * size
    log("connection %d: telling %d bytes" % (n, told))
    if mode == "silent":
        while c.recv(4096):
            pass
        return
    c.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    recv_all(c, 4)
    structured = False
    while True:
        magic, opt, length = struct.unpack(">QII", recv_all(c, 16))
        payload = recv_all(c, length)
        if opt == 8:
            structured = True
            opt_reply(c, opt, 1)
        elif opt in (9, 10):
            nl = struct.unpack(">I", payload[:4])[0]
            nq = struct.unpack(">I", payload[4 + nl:8 + nl])[0]
            p, names = 8 + nl, []
            for _ in range(nq):
                ql = struct.unpack(">I", payload[p:p + 4])[0]
                names.append(payload[p + 4:p + 4 + ql])
                p += 4 + ql
            if b"base:allocation" in names or not names:
                opt_reply(c, opt, 4, struct.pack(">I", 1) + b"base:allocation")
            opt_reply(c, opt, 1)
        elif opt in (6, 7):
            opt_reply(c, opt, 3, struct.pack(">HQH", 0, told, 1 | 4 | 32 | 64))
            minimum = 512 if mode == "size-odd" else 1
            opt_reply(c, opt, 3, struct.pack(">HIII", 3, minimum, 4096, 32 << 20))
            opt_reply(c, opt, 1)
            if opt == 7:
                break
        elif opt == 2:
            opt_reply(c, opt, 1)
            return
        else:
            opt_reply(c, opt, 0x80000001)
    while True:
        magic, flags, typ, cookie, offset, length = struct.unpack(">IHHQQI", recv_all(c, 28))
        if magic != REQMAGIC:
            log("bad request magic")
            return
        log("cmd %d offset %d length %d" % (typ, offset, length))
        if typ in (0, 1, 4, 6, 7) and offset + length > told:
            log("OUTSIDE: cmd %d offset %d length %d told %d" % (typ, offset, length, told))
        if typ == 1:
            buf = recv_all(c, length)
            if offset + length <= told:
                with lock:
                    fd = os.open(log_path + ".data", os.O_WRONLY | os.O_CREAT, 0o600)
                    os.pwrite(fd, buf, offset)
                    os.close(fd)
        if typ == 2:
            return
        if mode == "silent-after-go":
            continue
        if typ == 0:
            if not structured:
                c.sendall(struct.pack(">IIQ", SIMPLEMAGIC, 0, cookie) + pattern(offset, length))
            elif mode == "read-beyond":
                chunk(c, 1, 1, cookie, struct.pack(">Q", offset + length) + pattern(offset, length))
            elif mode == "read-short" and length > 1:
                half = length // 2
                chunk(c, 1, 1, cookie, struct.pack(">Q", offset) + pattern(offset, half))
            else:
                chunk(c, 1, 1, cookie, struct.pack(">Q", offset) + pattern(offset, length))
            continue
        if typ == 7:
            if mode == "bs-beyond":
                desc = struct.pack(">II", min(length + (1 << 30), 0xFFFFFE00), 0)
            elif mode == "bs-zero":
                desc = struct.pack(">II", 0, 0)
            elif mode == "bs-many":
                desc = struct.pack(">II", 512, 0) * 100000
            else:
                desc = struct.pack(">II", length, 0)
            ctx = 7 if mode == "bs-offset" else 1
            chunk(c, 1, 5, cookie, struct.pack(">I", ctx) + desc)
            continue
        if structured:
            chunk(c, 1, 0, cookie, b"")
        else:
            c.sendall(struct.pack(">IIQ", SIMPLEMAGIC, 0, cookie))


def handle(c):
    with lock:
        connections[0] += 1
        n = connections[0]
    try:
        serve(c, n)
    except (EOFError, ConnectionError, struct.error) as e:
        log("connection %d: %s" % (n, type(e).__name__))
    finally:
        c.close()


def main():
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.listen(16)
    log("listening, mode %s" % mode)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


main()
