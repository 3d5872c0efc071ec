#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Hostile and careless clients of `bmirror serve`'s control socket, driven
# by tests/integration/test-control-hostile.sh (which says what is
# checked).  Usage: control-hostile.py BMIRROR SCRATCH_DIR.  Every wait is
# bounded; a failed check prints "FAIL: ..." and the script exits 1 after
# the remaining checks (each group runs on its own server).
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

BMIRROR, T = sys.argv[1], sys.argv[2]
failures = 0


def passed(what):
    print("PASS: %s" % what, flush=True)


def failed(what):
    global failures
    failures += 1
    print("FAIL: control-hostile: %s" % what, file=sys.stderr, flush=True)


def check(ok, what):
    if ok:
        passed(what)
    else:
        failed(what)
    return ok


SERVERS = []


@atexit.register
def _kill_servers():
    for p in SERVERS:
        if p.poll() is None:
            p.kill()
            p.wait()


class Serve:
    """A `bmirror serve` on IMAGE with its own sockets under T."""

    def __init__(self, name, image, *extra, cwd=None):
        self.ctl = os.path.join(T, name + ".ctl")
        self.nbd = os.path.join(T, name + ".nbd")
        self.errlog = open(os.path.join(T, name + ".err"), "w")
        for p in (self.ctl, self.nbd):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(
            [BMIRROR, "serve", "--nbd", "unix:" + self.nbd, "--control",
             self.ctl, *extra, image], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self.errlog, cwd=cwd or T)
        SERVERS.append(self.proc)
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.ctl) and os.path.exists(self.nbd)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("FAIL: control-hostile: %s did not start"
                                 % name)
            time.sleep(0.02)

    def stop(self, within=5.0):
        """SIGTERM; True if it exited with 0 within `within` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self.errlog.close()
        return rc == 0


class Client:
    def __init__(self, path, timeout=5.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s.connect(path)
                break
            except BlockingIOError:
                # The listen backlog is full (a Unix socket with a timeout
                # does not wait for room): try again, within the timeout.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.buf = b""

    def send(self, obj):
        self.s.sendall((json.dumps(obj) + "\n").encode())

    def line(self, timeout):
        """The next line as an object, or None (timeout, EOF)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                d = self.s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                return None
            if not d:
                return None
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def answer(self, timeout):
        """The next answer (events before it are skipped), or None."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.line(max(0.0, deadline - time.monotonic()))
            if m is None or "event" not in m:
                return m

    def ask(self, obj, timeout=5.0):
        self.send(obj)
        return self.answer(timeout)

    def event(self, names, timeout):
        deadline = time.monotonic() + timeout
        while True:
            m = self.line(max(0.0, deadline - time.monotonic()))
            if m is None or m.get("event") in names:
                return m

    def close(self):
        self.s.close()


def errno_of(ans):
    return (ans or {}).get("error", {}).get("errno")


def move(c, to, **kw):
    req = {"cmd": "move", "to": to}
    req.update(kw)
    return c.ask(req, 10)


def make_image(path, size=8 << 20):
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(size)


def same(a, b):
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read()


ENDED = ("COMPLETED", "CANCELLED", "FAILED")


def wait_gone(c, within):
    """Cancel whatever move a wrongly accepted destination started."""
    c.ask({"cmd": "cancel", "force": True}, within)
    c.event(ENDED, within)


# ---- destinations under --allow-dir ---------------------------------------
def test_destinations():
    ok, other = os.path.join(T, "ok"), os.path.join(T, "other")
    os.makedirs(os.path.join(ok, "x:"))
    os.makedirs(other)
    disk = os.path.join(T, "disk.raw")
    make_image(disk)
    srv = Serve("allow", disk, "--allow-dir", ok, cwd=other)
    c = Client(srv.ctl)

    outside = os.path.join(T, "outside.raw")
    a = move(c, ok + "/x://../../outside.raw", create=True)
    time.sleep(0.3)
    if check(errno_of(a) == 1 and not os.path.exists(outside),
             "DIR/x://../../outside.raw is a path and is refused out of "
             "--allow-dir (got %s)" % a) is False and "return" in (a or {}):
        wait_gone(c, 10)
    a = move(c, "x://../escaped.raw", create=True)
    time.sleep(0.3)
    if not check(errno_of(a) == 22 and not os.path.exists(
            os.path.join(T, "escaped.raw")) and not os.path.exists(
            os.path.join(other, "escaped.raw")),
            "a relative x://... destination is refused as not absolute "
            "(got %s)" % a) and "return" in (a or {}):
        wait_gone(c, 10)
    a = move(c, ok + "/x://inside.raw", create=True, pivot=False)
    inside = os.path.join(ok, "x:", "inside.raw")
    if check("return" in (a or {}) and os.path.exists(inside),
             "DIR/x://inside.raw is the file x:/inside.raw inside the "
             "allowed directory (got %s)" % a):
        c.ask({"cmd": "cancel", "force": True})
        c.event(ENDED, 20)

    # A hard link to a file outside: writing it would write outside.
    victim = os.path.join(other, "victim.raw")
    make_image(victim)
    before = open(victim, "rb").read()
    os.link(victim, os.path.join(ok, "hl.raw"))
    a = move(c, os.path.join(ok, "hl.raw"))
    if not check(errno_of(a) == 1, "an existing destination with another "
                 "hard link is refused (got %s)" % a) and "return" in (a or {}):
        c.event(ENDED, 20)
    check(open(victim, "rb").read() == before,
          "the hard-linked file outside is unchanged")
    # A dangling symlink as a new file.
    os.symlink(os.path.join(other, "made.raw"), os.path.join(ok, "dangle.raw"))
    a = move(c, os.path.join(ok, "dangle.raw"), create=True)
    check(errno_of(a) == 40 and not os.path.exists(os.path.join(
        other, "made.raw")), "a dangling symlink is refused (got %s)" % a)

    a = move(c, "nbd://127.0.0.1:1/x")
    check(errno_of(a) == 1 and "allow-nbd" in str(a),
          "--allow-dir without --allow-nbd refuses NBD (got %s)" % a)
    if "return" in (a or {}):
        c.event(ENDED, 40)
    c.close()
    check(srv.stop(), "serve --allow-dir exits 0 on SIGTERM")

    # NBD destinations the operator allows, one served by another bmirror.
    make_image(os.path.join(T, "nbd-dst.raw"))
    dsrv = Serve("dst", os.path.join(T, "nbd-dst.raw"))
    srv = Serve("allow-nbd", disk, "--allow-dir", ok,
                "--allow-nbd", "unix:" + dsrv.nbd, "--allow-nbd", "127.0.0.1")
    c = Client(srv.ctl)
    a = move(c, "nbd://127.0.0.2:1/x")
    check(errno_of(a) == 1, "an NBD host not in --allow-nbd is refused "
          "(got %s)" % a)
    if "return" in (a or {}):
        c.event(ENDED, 40)
    for uri in ("nbd+unix:///?socket=" + os.path.join(T, "none.sock"),
                "nbd+unix:///?socket=%s&tls-psk-file=/etc/passwd" % dsrv.nbd,
                "nbd+unix:///?socket=%s#x" % dsrv.nbd,
                "nbd+unix://h/?socket=%s" % dsrv.nbd,
                "nbd+unix:///?socket=%s" % dsrv.nbd.replace("/", "%2F"),
                "NBD://127.0.0.1/x", "nbd:foo"):
        a = move(c, uri)
        if not check(errno_of(a) in (1, 22), "%s is refused (got %s)"
                     % (uri, a)) and "return" in (a or {}):
            c.event(ENDED, 40)

    a = move(c, "nbd://127.0.0.1:1/x")
    check(errno_of(a) not in (1, 22, None), "an NBD host in --allow-nbd "
          "passes the check (then fails to connect: %s)" % a)
    if "return" in (a or {}):
        c.event(ENDED, 40)

    # The allowed NBD destination works.
    a = move(c, "nbd+unix:///?socket=" + dsrv.nbd)
    ev = c.event(ENDED, 30) if "return" in (a or {}) else None
    check(ev is not None and ev.get("event") == "COMPLETED",
          "a move to an NBD socket in --allow-nbd completes (got %s, %s)"
          % (a, ev))
    check(same(disk, os.path.join(T, "nbd-dst.raw")),
          "the allowed NBD destination has the data")
    c.close()
    check(srv.stop(), "serve --allow-dir exits 0 on SIGTERM")
    dsrv.stop()


# ---- clients that do not read -----------------------------------------------
def flood_unread(path, lines, seconds, first=None):
    """Connect, send `first` then `lines` query lines without ever reading
    (as many as the server takes within `seconds`); return the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    data = b""
    if first:
        data += (json.dumps(first) + "\n").encode()
    data += b'{"cmd":"query"}\n' * lines
    deadline = time.monotonic() + seconds
    off = 0
    while off < len(data) and time.monotonic() < deadline:
        try:
            off += s.send(data[off:off + 65536])
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break
    return s


def quick_queries(path, n, within, what):
    c = Client(path)
    worst = 0.0
    for _ in range(n):
        t0 = time.monotonic()
        a = c.ask({"cmd": "query"}, 5)
        dt = time.monotonic() - t0
        worst = max(worst, dt)
        if a is None or "return" not in a:
            c.close()
            return check(False, "%s: a query went unanswered (%s)" % (what, a))
    c.close()
    return check(worst < within, "%s: %d queries answered, the slowest in "
                 "%.3f s" % (what, n, worst))


def test_unread():
    disk = os.path.join(T, "u.raw")
    make_image(disk)
    srv = Serve("unread", disk)
    hog = flood_unread(srv.ctl, 20000, 3)
    quick_queries(srv.ctl, 5, 1.0, "beside a client that never reads")

    c = Client(srv.ctl)
    for i in (1, 2):
        a = move(c, os.path.join(T, "u%d.raw" % i), create=True)
        ev = c.event(ENDED, 30) if "return" in (a or {}) else None
        check(ev is not None and ev.get("event") == "COMPLETED",
              "move %d completes beside a client that never reads "
              "(got %s, %s)" % (i, a, ev))
    c.close()

    # The client that started the move is the one that never reads.
    hog2 = flood_unread(srv.ctl, 20000, 3, first={
        "cmd": "move", "to": os.path.join(T, "u3.raw"), "create": True})
    c = Client(srv.ctl)
    deadline = time.monotonic() + 30
    state = None
    while time.monotonic() < deadline:
        a = c.ask({"cmd": "query"}, 2)
        state = (((a or {}).get("return") or {}).get("job") or {}).get("state")
        if state in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.1)
    check(state == "completed", "a move whose client never reads still "
          "pivots and completes (state %s)" % state)
    a = move(c, os.path.join(T, "u4.raw"), create=True)
    ev = c.event(ENDED, 30) if "return" in (a or {}) else None
    check(ev is not None and ev.get("event") == "COMPLETED",
          "the next move is accepted and completes, no EBUSY (got %s, %s)"
          % (a, ev))
    c.close()

    t0 = time.monotonic()
    check(srv.stop(3.0), "SIGTERM ends serve with clients that never read, "
          "in %.2f s" % (time.monotonic() - t0))
    hog.close()
    hog2.close()


def test_flood():
    disk = os.path.join(T, "f.raw")
    make_image(disk)
    srv = Serve("flood", disk)
    stop = threading.Event()

    def flooder():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.ctl)

        def drain():
            s.settimeout(0.5)
            while not stop.is_set():
                try:
                    if not s.recv(1 << 20):
                        return
                except socket.timeout:
                    continue
                except OSError:
                    return
        r = threading.Thread(target=drain)
        r.start()
        chunk = b'{"cmd":"query"}\n' * 4096
        s.settimeout(1)
        while not stop.is_set():
            try:
                s.sendall(chunk)
            except socket.timeout:
                continue
            except OSError:
                break
        r.join()
        s.close()

    threads = [threading.Thread(target=flooder) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    quick_queries(srv.ctl, 20, 1.0, "beside two flooding clients")
    stop.set()
    for t in threads:
        t.join(10)
    check(srv.stop(3.0), "serve exits 0 after the flood")


def test_careless():
    disk = os.path.join(T, "c.raw")
    make_image(disk)
    srv = Serve("careless", disk)
    # Gone in the middle of a line, gone before reading the answer, and
    # half-closed after a line (like `socat -`): the last gets its answer.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.ctl)
    s.sendall(b'{"cmd":"que')
    s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.ctl)
    s.sendall(b'{"cmd":"query"}\n' * 100)
    s.close()
    c = Client(srv.ctl)
    c.send({"cmd": "query"})
    c.s.sendall(b'{"cmd":"query"}\n{"cmd":"qu')
    c.s.shutdown(socket.SHUT_WR)
    a, b, e = c.line(5), c.line(5), c.line(5)
    check(a and b and "return" in a and "return" in b and e is None,
          "a half-closed client gets its answers, then EOF (%s, %s, %s)"
          % (a, b, e))
    c.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.ctl)
    s.sendall(b"x" * 70000)
    s.settimeout(5)
    try:
        gone = s.recv(100) == b""
    except ConnectionResetError:
        gone = True  # closed with our bytes unread
    except socket.timeout:
        gone = False
    s.close()
    check(gone, "a line over 64 KiB ends the connection")
    quick_queries(srv.ctl, 3, 1.0, "after careless clients")

    # 50 clients at once, each with a query in flight.
    cs = [Client(srv.ctl) for _ in range(50)]
    for c in cs:
        try:
            c.send({"cmd": "query"})
        except OSError:
            pass  # turned away: counted as unanswered below
    answers = [c.answer(5) for c in cs]
    check(all(a and "return" in a for a in answers),
          "50 clients at once are all answered (%d of 50)"
          % sum(1 for a in answers if a and "return" in a))
    for c in cs:
        c.close()
    check(srv.stop(3.0), "serve exits 0 after the careless clients")


# ---- consistency-group commands (snapshot-hold and the rest) --------------
def test_group():
    disk = os.path.join(T, "g.raw")
    make_image(disk)
    srv = Serve("group", disk)
    c, other = Client(srv.ctl), Client(srv.ctl)
    bad = [
        ({"cmd": "snapshot-hold"}, 22),
        ({"cmd": "snapshot-hold", "group": 7}, 22),
        ({"cmd": "snapshot-hold", "group": ""}, 22),
        ({"cmd": "snapshot-hold", "group": "a/b"}, 22),
        ({"cmd": "snapshot-hold", "group": "x" * 65}, 22),
        ({"cmd": "snapshot-hold", "group": "g", "lease_ms": -1}, 22),
        ({"cmd": "snapshot-hold", "group": "g", "lease_ms": "5"}, 22),
        ({"cmd": "snapshot-hold", "group": "g", "lease_ms": 60001}, 22),
        ({"cmd": "snapshot-hold", "group": "g", "lease_ms": 2 ** 70},
         (22, 71)),
        ({"cmd": "snapshot-hold", "group": "g", "export": 1}, 22),
        ({"cmd": "snapshot-hold", "group": "g", "since": "cp"}, 22),
        ({"cmd": "snapshot-take", "group": "nosuch"}, 2),
        ({"cmd": "snapshot-commit", "group": "nosuch"}, 2),
        ({"cmd": "snapshot-abort", "group": "nosuch"}, 2),
    ]
    for req, want in bad:
        a = c.ask(req)
        want = want if isinstance(want, tuple) else (want,)
        check(errno_of(a) in want, "%s is refused with errno %s (got %s)"
              % (json.dumps(req)[:80], want, a))
    a = c.ask({"cmd": "query"})
    check(a and "group" not in a["return"] and
          a["return"]["snapshots"] == [],
          "refused group commands leave nothing (got %s)" % a)

    # Another client can neither take nor abort the holder's group, nor
    # start one of its own, nor a plain snapshot, while it is held.
    a = c.ask({"cmd": "snapshot-hold", "group": "mine", "lease_ms": 60000})
    check(a and a.get("return", {}).get("held") is True,
          "a hold with the longest lease is granted (got %s)" % a)
    for req, want in (({"cmd": "snapshot-take", "group": "mine"}, 1),
                      ({"cmd": "snapshot-abort", "group": "mine"}, 1),
                      ({"cmd": "snapshot-hold", "group": "theirs"}, 16),
                      ({"cmd": "snapshot"}, 16)):
        a = other.ask(req)
        check(errno_of(a) == want, "another client's %s while held: "
              "errno %d (got %s)" % (req["cmd"], want, a))
    a = c.ask({"cmd": "snapshot-commit", "group": "mine"})
    check(errno_of(a) == 22, "a commit before the take is refused (got %s)"
          % a)
    # The holder goes away: the 60 s lease does not keep the disk.
    c.close()
    t0 = time.monotonic()
    while True:
        a = other.ask({"cmd": "snapshot", "export": "after"}, 5.0)
        if errno_of(a) != 16 or time.monotonic() - t0 > 2:
            break
        time.sleep(0.01)  # the close not seen yet
    check(a and "return" in a and time.monotonic() - t0 < 2,
          "a holder that goes away lets the disk go at once (%.2f s, %s)"
          % (time.monotonic() - t0, a))
    a = other.ask({"cmd": "query"})
    check(a and "group" not in a["return"],
          "the group is gone with its holder (got %s)" % a)
    a = other.ask({"cmd": "snapshot-release", "export": "after"})
    check(a and "return" in a, "release after (got %s)" % a)

    # A holder that stays connected but silent: once the lease ran out
    # the group ends, for the others (a plain snapshot is not refused;
    # the group is not theirs, errno 2) and for the holder (errno 110
    # naming the lease; an abort says it expired).
    c = Client(srv.ctl)
    a = c.ask({"cmd": "snapshot-hold", "group": "short", "lease_ms": 100})
    check(a and a.get("return", {}).get("held") is True,
          "a hold with a 100 ms lease is granted (got %s)" % a)
    t0 = time.monotonic()
    while True:
        a = other.ask({"cmd": "snapshot", "export": "late"}, 5.0)
        if errno_of(a) != 16 or time.monotonic() - t0 > 5:
            break
        time.sleep(0.01)  # the lease has not run out yet
    check(a and "return" in a,
          "a snapshot after the lease ran out is not refused (after %.2f "
          "s: %s)" % (time.monotonic() - t0, a))
    a = other.ask({"cmd": "snapshot-take", "group": "short"})
    check(errno_of(a) == 2, "another client's take of an expired group: "
          "errno 2 (got %s)" % a)
    a = c.ask({"cmd": "snapshot-take", "group": "short"})
    check(errno_of(a) == 110 and "lease of 100 ms" in str(a),
          "the holder's take after the lease: errno 110 naming the lease "
          "(got %s)" % a)
    a = c.ask({"cmd": "snapshot-abort", "group": "short"})
    check(a and a.get("return", {}).get("expired") is True,
          "the holder's abort after the lease says it expired (got %s)" % a)
    a = other.ask({"cmd": "snapshot-release", "export": "late"})
    check(a and "return" in a, "release late (got %s)" % a)
    c.close()

    # The hold runs beside the control thread: a hold whose scratch is
    # slow to open (an NBD server that takes 2 s over each connection)
    # does not stop the server answering the others; the holder gets its
    # answer when the disk is held, and its next command after that.
    sock = os.path.join(T, "slow-scratch.sock")
    kit = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-U", sock,
                            "--filter=delay", "memory", "16M",
                            "delay-open=2"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.02)
    c = Client(srv.ctl)
    t0 = time.monotonic()
    c.send({"cmd": "snapshot-hold", "group": "slow", "lease_ms": 5000,
            "scratch": "nbd+unix:///?socket=" + sock})
    c.send({"cmd": "query"})
    while True:  # until the server has read the hold
        t1 = time.monotonic()
        a = other.ask({"cmd": "query"}, 5.0)
        took = time.monotonic() - t1
        if not a or "group" in a["return"] or t1 - t0 > 1.5:
            break
        time.sleep(0.01)
    check(a and a["return"].get("group", {}).get("state") == "holding"
          and took < 0.5,
          "another client is answered while a hold opens its scratch "
          "(in %.2f s: %s)" % (took, a))
    a = other.ask({"cmd": "snapshot"})
    check(errno_of(a) == 16, "a snapshot while a hold runs: errno 16 "
          "(got %s)" % a)
    a = c.answer(15.0)
    took = time.monotonic() - t0
    check(a and a.get("return", {}).get("held") is True and took >= 1.5,
          "the holder's answer comes once held (%.2f s: %s)" % (took, a))
    a = c.answer(5.0)
    check(a and a["return"].get("group", {}).get("state") == "held",
          "the holder's next command is answered after the hold (%s)" % a)
    a = c.ask({"cmd": "snapshot-abort", "group": "slow"})
    check(a and a.get("return", {}).get("group") == "slow",
          "the slow hold is aborted (got %s)" % a)
    c.close()
    kit.terminate()
    kit.wait()
    other.close()
    check(srv.stop(3.0), "serve exits 0 after the group commands")


only = os.environ.get("ONLY")
for name, fn in (("destinations", test_destinations), ("unread", test_unread),
                 ("flood", test_flood), ("careless", test_careless),
                 ("group", test_group)):
    if not only or only == name:
        fn()
sys.exit(1 if failures else 0)
