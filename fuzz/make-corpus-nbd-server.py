#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Write the seed corpus of fuzz-nbd-server into corpus/nbd-server/.

Each seed is one byte choosing the server (0 writable, 1 read-only named
"fuzz", 2 TLS required) and then what a client sends: handshake flags,
options, transmission requests and payloads, as the NBD protocol lays
them out.  The server's replies are not part of the input.
"""
import os
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7,
           STRUCTURED_REPLY=8, LIST_META=9, SET_META=10, EXTENDED=11)
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5,
           WRITE_ZEROES=6, BLOCK_STATUS=7)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def flags(f=3):
    return struct.pack(">I", f)


def opt(o, data=b"", length=None):
    o = OPT.get(o, o)
    return struct.pack(">QII", IHAVEOPT, o,
                       len(data) if length is None else length) + data


def info_data(name=b"", infos=()):
    return (struct.pack(">I", len(name)) + name +
            struct.pack(">H", len(infos)) +
            b"".join(struct.pack(">H", i) for i in infos))


def meta_data(name=b"", queries=()):
    return (struct.pack(">I", len(name)) + name +
            struct.pack(">I", len(queries)) +
            b"".join(struct.pack(">I", len(q)) + q for q in queries))


def req(cmd, offset=0, length=0, fl=0, cookie=1, payload=b""):
    cmd = CMD.get(cmd, cmd)
    return struct.pack(">IHHQQI", REQ_MAGIC, fl, cmd, cookie, offset,
                       length) + payload


def go(name=b"", infos=(1, 2, 3)):
    return opt("GO", info_data(name, infos))


SEEDS = {
    "rw-simple": b"\0" + flags() + go() + b"".join([
        req("READ", 0, 4096, cookie=1),
        req("WRITE", 4096, 512, cookie=2, payload=b"\xaa" * 512),
        req("WRITE", 8192, 16, FUA, cookie=3, payload=b"\x55" * 16),
        req("FLUSH", cookie=4),
        req("TRIM", 65536, 4096, FUA, cookie=5),
        req("WRITE_ZEROES", 0, 1024, cookie=6),
        req("WRITE_ZEROES", 1024, 1024, NO_HOLE | FUA, cookie=7),
        req("WRITE_ZEROES", 0, 512, FAST_ZERO, cookie=8),
        req("CACHE", 0, 1 << 20, cookie=9),
        req("READ", 4096, 512, cookie=10),
        req("DISC"),
    ]),
    "rw-structured": b"\0" + flags(1) + b"".join([
        opt("STRUCTURED_REPLY"),
        opt("LIST_META", meta_data(b"", [])),
        opt("LIST_META", meta_data(b"", [b"base:"])),
        opt("SET_META", meta_data(b"", [b"base:allocation", b"qemu:x"])),
        go(b"", ()),
        req("BLOCK_STATUS", 0, 1 << 20, cookie=1),
        req("BLOCK_STATUS", 4096, 8192, REQ_ONE, cookie=2),
        req("READ", 0, 8192, DF, cookie=3),
        req("READ", (1 << 20) - 1, 2, cookie=4),
        req("WRITE", (1 << 20) - 1, 2, cookie=5, payload=b"xy"),
        req("READ", 0, 0, cookie=6),
        req("READ", 0, 1, REQ_ONE, cookie=7),
        req(99, 0, 1, cookie=8),
        req("FLUSH", 1, 1, cookie=9),
        req("READ", 2**64 - 512, 1024, cookie=10),
        req("DISC"),
    ]),
    "ro-named": b"\1" + flags(1) + b"".join([
        opt("LIST"),
        opt("LIST", b"x"),
        opt("INFO", info_data(b"fuzz", (0, 1, 2, 3, 77))),
        opt("INFO", info_data(b"nope", ())),
        opt("INFO", b"\0\0\0\xff\0"),
        opt("EXPORT_NAME", b"fuzz"),
        req("WRITE", 0, 16, cookie=1, payload=b"z" * 16),
        req("TRIM", 0, 16, cookie=2),
        req("READ", 0, 4096, cookie=3),
    ]),
    "ro-export-unknown": b"\1" + flags(3) + opt("EXPORT_NAME", b"vdb"),
    "tls-required": b"\2" + flags(3) + b"".join([
        opt("GO", info_data()),
        opt("LIST"),
        opt("STARTTLS", b"x"),
        opt("STARTTLS"),
        b"\x16\x03\x01\x00\x05hello",
    ]),
    "tls-export-name": b"\2" + flags(3) + opt("EXPORT_NAME", b""),
    "tls-abort": b"\2" + flags(3) + opt("ABORT"),
    "options-odd": b"\0" + flags(3) + b"".join([
        opt("EXTENDED"),
        opt(12345, b"data"),
        opt("STRUCTURED_REPLY", b"x"),
        opt("SET_META", meta_data(b"", [b"base:allocation"])),
        opt("STARTTLS"),
        opt("LIST_META", b"\0\0\0\5ab"),
        opt("ABORT"),
    ]),
    "option-too-big": b"\0" + flags(3) + opt("LIST", b"", 65537) +
        b"\0" * 64,
    "option-huge": b"\0" + flags(3) + opt("LIST", b"", 0xffffffff),
    "option-bad-magic": b"\0" + flags(3) + b"IHAVEOPX" + b"\0" * 8,
    "flags-bad": b"\0" + flags(0x80000001),
    "flags-none": b"\0" + flags(0),
    "truncated-request": b"\0" + flags(3) + go() + req("WRITE", 0, 4096,
                                                       payload=b"a" * 10),
    "bad-request-magic": b"\0" + flags(3) + go() + b"\x25\x60\x95\x14" +
        b"\0" * 24,
    "write-too-big": b"\0" + flags(3) + go() + req("WRITE", 0, 0xffffffff),
    "pipeline": b"\0" + flags(3) + opt("STRUCTURED_REPLY") + go() +
        b"".join(req("READ", (i * 4096) % (1 << 20), 4096, cookie=i)
                 for i in range(80)),
    "empty": b"\0",
    # Block status over the whole disk, many at once with no reply read,
    # then EOF while steps are still queued (docs/nbd-server.md).
    "block-status-flood": b"\0" + flags(3) + b"".join([
        opt("STRUCTURED_REPLY"),
        opt("SET_META", meta_data(b"", [b"base:allocation"])),
        go(b"", ()),
    ]) + b"".join(req("BLOCK_STATUS", (i * 512) % (1 << 20),
                      (1 << 20) - (i * 512) % (1 << 20),
                      REQ_ONE if i % 3 == 0 else 0, cookie=i)
                  for i in range(100)),
}


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])),
                       "corpus", "nbd-server")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
