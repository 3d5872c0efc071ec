#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""bench/replication.py: replication's achieved RPO and what it costs the guest, from one run.

  python3 bench/replication.py                  # 1 GiB disk, 5 runs, 20 s each
  python3 bench/replication.py --quick          # a smoke test: 256 MiB, 2 runs, 8 s
  python3 bench/replication.py --runs 7 --json repl.json

A raw disk (75% of its 1 MiB extents random data) is served by `bmirror serve
--track` (--granularity: the tracking unit, default 64K); a replica (`bmirror replica serve`, over TCP on localhost with TLS-PSK, as
between two hosts) takes its points at 1-second cycles (`bmirror replicate
--interval 1`).  The guest is fio over NBD: 4 KiB random writes, queue depth 16.

  rpo     At a steady load (--rates, IOPS), for --seconds: every POINT_COMMITTED
          event is read from serve's control socket as it arrives, with the point's
          instant.  A write acknowledged at t is in the first point whose instant is
          after t, so its RPO is that point's commit time minus t.  Writes arrive
          evenly at a steady rate, so the RPO of writes is sampled uniformly over the
          window: p50, p99 and max, in seconds.
  iops    Unthrottled fio for --seconds, alternately with replication running and
          without (the order rotated from run to run): guest IOPS with / without
          (goal: a cost under 10%, i.e. a ratio >= 0.90), serve's CPU time, and the
          MiB replication sent against the MiB the guest wrote.

--replica-dir puts the replica's directory elsewhere (/dev/shm: its writes off the
disk the guest writes to, as on a second host); --replica-granularity is its granule.

Every case runs --runs times (default 5); tables give medians and min-max.

Needs python3 (stdlib only), bmirror (--bmirror, build/tools/bmirror) and fio.
"""
import argparse, json, os, random, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import MiB, GiB, Failed, Daemon, check, rm, spread, table, write_extents   # noqa: E402

IOPS_COST_GOAL = 0.90


def psk_file(d):
    path = os.path.join(d, 'keys.psk')
    with open(path, 'w') as f:
        f.write('bmirror:' + os.urandom(32).hex() + '\n')
    os.chmod(path, 0o600)
    return path


def proc_cpu(pid):
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class Events(threading.Thread):
    """Read serve's control socket: POINT_COMMITTED events with their arrival time."""
    def __init__(self, ctl):
        super().__init__(daemon=True)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(ctl)
        self.points, self.stop = [], False
        # A command so the server knows us; events go to every client.
        self.s.sendall(b'{"cmd": "replicate-status"}\n')
        self.start()

    def run(self):
        buf = b''
        while not self.stop:
            try:
                data = self.s.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b'\n' in buf:
                line, buf = buf.split(b'\n', 1)
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get('event') == 'POINT_COMMITTED':
                    self.points.append((ev['instant_ns'] / 1e9, time.time()))

    def close(self):
        self.stop = True
        self.s.close()


def rpo_samples(points, t0, t1, n=20000):
    """RPO of writes uniformly spread over [t0, t1]: commit time of the first point after each."""
    pts = sorted(points)
    out, rnd = [], random.Random(1)
    for _ in range(n):
        t = rnd.uniform(t0, t1)
        later = [c for i, c in pts if i >= t]
        if later:
            out.append(min(later) - t)
    return out


def fmt(xs):
    sp = spread(xs)
    return f'{sp["median"]:.2f} ({sp["min"]:.2f}-{sp["max"]:.2f})'


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


class Setup:
    def __init__(self, args, d, size):
        self.args, self.d = args, d
        self.disk = os.path.join(d, 'disk.raw')
        offsets = [o for o in range(0, size, MiB) if random.Random(o).random() < 0.75]
        write_extents(self.disk, size, offsets, 7)
        self.key = psk_file(d)
        self.ctl = os.path.join(d, 'ctl.sock')
        self.nbd = os.path.join(d, 'nbd.sock')
        self.uri = f'nbd+unix:///?socket={self.nbd}'
        self.serve = Daemon([args.bmirror, 'serve', '--track', '--track-granularity', args.granularity,
                             '--nbd', 'unix:' + self.nbd, '--control', self.ctl, self.disk],
                            d, 'serve', [self.nbd, self.ctl])
        rdir = os.path.join(args.replica_dir or d, f'replica-{os.getpid()}')
        shutil.rmtree(rdir, ignore_errors=True)
        self.rdir = rdir
        out = os.path.join(d, 'replica.out')
        with open(out, 'w') as f:
            self.replica = subprocess.Popen([args.bmirror, 'replica', 'serve', rdir, '--create', '--size', str(size),
                                             '--granularity', args.replica_granularity,
                                             '--listen', 'tcp:127.0.0.1:0', '--tls-psk', self.key, '--json'],
                                            stdout=f, stderr=subprocess.DEVNULL)
        end, self.addr = time.time() + 30, None
        while not self.addr and time.time() < end:
            with open(out) as f:
                for line in f:
                    ev = json.loads(line)
                    if ev.get('event') == 'LISTENING':
                        self.addr = ev['address']
            time.sleep(0.05)
        if not self.addr:
            raise Failed(self.replica.args, '', 'the replica did not start')
        self.replicating = False

    def start_replication(self):
        check([self.args.bmirror, 'replicate', '--control', self.ctl, '--to', self.addr, '--tls-psk', self.key,
               '--interval', '1'], 'replicate')
        check([self.args.bmirror, 'replicate', 'sync', '--control', self.ctl, '--timeout', '600'], 'first point')
        self.replicating = True

    def status(self):
        out = subprocess.run([self.args.bmirror, 'replicate', 'status', '--control', self.ctl, '--json'],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def stop_replication(self):
        check([self.args.bmirror, 'replicate', 'stop', '--control', self.ctl], 'replicate stop')
        self.replicating = False

    def close(self):
        self.serve.stop()
        self.replica.terminate()
        self.replica.wait()
        shutil.rmtree(self.rdir, ignore_errors=True)


def fio(uri, seconds, rate=None, d='.'):
    out = os.path.join(d, 'fio.json')
    cmd = ['fio', '--name=guest', '--ioengine=nbd', '--uri=' + uri, '--rw=randwrite', '--bs=4k', '--iodepth=16',
           '--size=100%', '--time_based', f'--runtime={seconds}', '--randrepeat=0', '--output-format=json',
           '--output=' + out] + ([f'--rate_iops={rate}'] if rate else [])
    check(cmd, 'fio')
    with open(out) as f:
        return json.load(f)['jobs'][0]['write']


def bench_rpo(args, s, out):
    for rate in args.rates:
        rows = []
        for run in range(args.runs):
            ev = Events(s.ctl)
            t0 = time.time()
            fio(s.uri, args.seconds, rate, s.d)
            t1 = time.time()
            time.sleep(3)   # the points that hold the last writes
            ev.close()
            xs = rpo_samples(ev.points, t0 + 1, t1)
            if not xs:
                raise Failed(['rpo'], '', 'no point was committed during the load')
            rows.append({'p50': pct(xs, 50), 'p99': pct(xs, 99), 'max': max(xs), 'points': len(ev.points)})
        out['rpo'].append({'rate': rate, 'runs': rows})


def bench_iops(args, s, out):
    rows = []
    for run in range(args.runs):
        r = {}
        for with_repl in ([True, False] if run % 2 == 0 else [False, True]):
            if with_repl and not s.replicating:
                s.start_replication()
            if not with_repl and s.replicating:
                s.stop_replication()
            cpu0 = proc_cpu(s.serve.p.pid)
            st0 = s.status() if with_repl else None
            w = fio(s.uri, args.seconds, None, s.d)
            r['with' if with_repl else 'without'] = {'iops': w['iops'], 'serve_cpu_s': proc_cpu(s.serve.p.pid) - cpu0}
            if with_repl:
                st1 = s.status()
                r['with']['sent_mib'] = (st1['bytes_sent'] - st0['bytes_sent']) / MiB
                r['with']['written_mib'] = w['io_bytes'] / MiB
                r['with']['cycles'] = st1['cycles'] - st0['cycles']
        r['ratio'] = r['with']['iops'] / r['without']['iops']
        rows.append(r)
    out['iops'] = rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--size', default='1G')
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--seconds', type=int, default=20)
    ap.add_argument('--rates', default='1000,5000', help='guest IOPS for the RPO part')
    ap.add_argument('--only', default='rpo,iops')
    ap.add_argument('--granularity', default='64K', help="the served disk's change-tracking unit")
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--dir', default='/var/tmp')
    ap.add_argument('--replica-granularity', default='64K', help="the replica's granule (its layers' cluster size)")
    ap.add_argument('--replica-dir', help='where the replica keeps its disk (default: beside the primary\'s, '
                    'in --dir); /dev/shm takes its writes off the shared disk, as a second host would')
    ap.add_argument('--keep', action='store_true')
    ap.add_argument('--json')
    ap.add_argument('--bmirror', default='build/tools/bmirror')
    args = ap.parse_args()
    if args.quick:
        args.size, args.runs, args.seconds = '256M', 2, 8
    args.rates = [int(x) for x in args.rates.split(',')]
    size = int(args.size[:-1]) * {'M': MiB, 'G': GiB}[args.size[-1]]
    d = tempfile.mkdtemp(prefix='bm-bench-repl-', dir=args.dir)
    out = {'rpo': [], 'iops': [], 'size': size}
    s = None
    try:
        s = Setup(args, d, size)
        s.start_replication()
        if 'rpo' in args.only:
            bench_rpo(args, s, out)
        if 'iops' in args.only:
            bench_iops(args, s, out)
    finally:
        if s:
            s.close()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    print()
    if out['rpo']:
        print('Achieved RPO at 1-second cycles (seconds from a write\'s acknowledgement to the commit of a point '
              'holding it)')
        table(['guest IOPS', 'p50', 'p99', 'max', 'points/run'],
              [[r['rate'], fmt([x['p50'] for x in r['runs']]), fmt([x['p99'] for x in r['runs']]),
                fmt([x['max'] for x in r['runs']]), statistics.median(x['points'] for x in r['runs'])]
               for r in out['rpo']])
        print()
    if out['iops']:
        ratios = [r['ratio'] for r in out['iops']]
        print('Guest IOPS, unthrottled, with replication / without')
        table(['with', 'without', 'ratio', 'serve CPU s with', 'without', 'MiB sent / written', 'goal'],
              [[f'{statistics.median(r["with"]["iops"] for r in out["iops"]):.0f}',
                f'{statistics.median(r["without"]["iops"] for r in out["iops"]):.0f}',
                fmt(ratios),
                f'{statistics.median(r["with"]["serve_cpu_s"] for r in out["iops"]):.2f}',
                f'{statistics.median(r["without"]["serve_cpu_s"] for r in out["iops"]):.2f}',
                f'{statistics.median(r["with"]["sent_mib"] for r in out["iops"]):.0f} / '
                f'{statistics.median(r["with"]["written_mib"] for r in out["iops"]):.0f}',
                f'>= {IOPS_COST_GOAL} ({"met" if statistics.median(ratios) >= IOPS_COST_GOAL else "NOT met"})']])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
