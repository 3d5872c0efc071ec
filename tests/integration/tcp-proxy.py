#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A TCP proxy whose link can be stalled or cut, for test-replicate-faults.sh.

Usage: tcp-proxy.py PORTFILE TARGET_HOST TARGET_PORT

Listens on 127.0.0.1 (a free port, written to PORTFILE once listening) and
forwards every connection to TARGET, both ways, bytes untouched (TLS goes
through).  Each connection accepted adds a line to PORTFILE.accepts, so
that a test can wait for one.  Signals change the link:
  SIGUSR1  stall: keep every connection open, forward nothing (new ones
           are accepted and stall too)
  SIGUSR2  cut: close every connection now (new ones are forwarded)
  SIGHUP   back to forwarding
"""
import os, select, signal, socket, sys, threading

portfile, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = {'stall': False}
conns, lock = [], threading.Lock()


def pump(a, b):
    try:
        while True:
            while state['stall']:
                select.select([], [], [], 0.05)
            r, _, _ = select.select([a], [], [], 0.05)
            if not r:
                continue
            data = a.recv(65536)
            if not data:
                break
            while state['stall']:
                select.select([], [], [], 0.05)
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def serve(c):
    try:
        u = socket.create_connection((host, port))
    except OSError:
        c.close()
        return
    with lock:
        conns.extend([c, u])
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    threading.Thread(target=pump, args=(u, c), daemon=True).start()


def on_signal(sig, _frame):
    if sig == signal.SIGUSR1:
        state['stall'] = True
    elif sig == signal.SIGHUP:
        state['stall'] = False
    elif sig == signal.SIGUSR2:
        state['stall'] = False
        with lock:
            for s in conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            conns.clear()


for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
    signal.signal(sig, on_signal)
lsock = socket.socket()
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(('127.0.0.1', 0))
lsock.listen(16)
with open(portfile + '.tmp', 'w') as f:
    f.write(str(lsock.getsockname()[1]))
os.rename(portfile + '.tmp', portfile)
while True:
    try:
        c, _ = lsock.accept()
    except InterruptedError:
        continue
    with open(portfile + '.accepts', 'a') as f:
        f.write('accepted\n')
    threading.Thread(target=serve, args=(c,), daemon=True).start()
