#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""bench/backup.py: the snapshot, backup and restore figures, beside qemu-storage-daemon, from one run.

  python3 bench/backup.py                       # all three parts: 1 GiB disk, 5 runs
  python3 bench/backup.py --quick               # a smoke test: 256 MiB, 2 runs
  python3 bench/backup.py --only snap --runs 7 --json snap.json

Parts (--only snap,incr,restore; all by default):
  snap     Guest write cost while a snapshot exists.  A served raw disk (75% of its
           1 MiB extents random data) under fio over NBD (4 KiB random writes, queue
           depth 16, --warmup s of ramp then --seconds s measured): IOPS and p99
           completion latency (a) with no snapshot, (b) right after a snapshot, in
           its copy-before-write phase.  bmirror: `bmirror serve` + `bmirror
           snapshot` (scratch in the bench folder).  QSD: the disk exported over NBD;
           for (b) the export is replaced by one of a copy-before-write filter node
           (on-cbw-error=break-snapshot, cbw-timeout=1, like bmirror's defaults) over
           the disk, with a raw scratch target and a snapshot-access node exported
           read-only beside it.  Each run starts from a fresh copy of the disk and a
           fresh snapshot.  The server's CPU time (utime+stime from /proc) is taken
           over each fio phase.
  incr     Incremental backups.  bmirror: `bmirror serve --track`, a full point
           (`bmirror backup --control`), then 1%, 10% and 50% of the disk changed
           (64 KiB-aligned extents written over NBD by qemu-io, then flushed, the
           same list for both systems) each followed by `bmirror backup --incremental --json`,
           timed as a process.  QSD: a dirty bitmap (64 KiB) added in the same
           transaction as a blockdev-backup sync=full to a qcow2 target, then
           blockdev-backup sync=incremental into a new qcow2 whose backing file is
           the previous target, timed from the QMP command to BLOCK_JOB_COMPLETED
           (the target is created and added beforehand, untimed).  bytes_read /
           bytes the writes really changed (their 64 KiB chunks) is bmirror's
           precision; QSD's is the job's length.  Each chain's newest point is
           checked against the disk with `qemu-img compare`, untimed.
  restore  The newest point of a chain of a full and 2 incremental points (bmirror's
           own, from the first run of incr): `bmirror backup restore DIR --to
           out.raw` against `qemu-img convert -O raw DIR/0003.qcow2 out.raw` (and with
           -W -m 16), each followed by an fsync of out.raw; MiB/s of the disk's
           virtual size; each output compared with the point.

Every case runs --runs times (default 5) with the systems in an order rotated from
run to run; tables give medians and min-max.  Ratios are bmirror / QSD (or
bmirror / qemu-img) paired within a run.

Goals (issue 17; reported, never asserted):
  snapshot IOPS    during the copy-before-write phase, bmirror / QSD    >= 1
  snapshot p99     the same, bmirror / QSD                              <= 1
  incremental      bytes_read / bytes really changed                    within 5%
  (time ratios, bmirror / QSD: lower is better; restore MiB/s ratio: higher)

Needs python3 (stdlib only), bmirror (--bmirror, build/tools/bmirror), qemu-img,
qemu-io (qemu-utils), fio and qemu-storage-daemon (qemu-system-common).
"""
import argparse, json, os, random, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed   # noqa: E402  the project's bench helpers: Daemon, Qmp, Failed, check, timed, ...
from speed import MiB, GiB, Failed, Daemon, Qmp, check, fsync, rm, rotate, spread, human, table, goal

CHUNK = 64 << 10            # granule of the change lists, bmirror's snapshots and QSD's bitmap
PCTS = (1, 10, 50)          # percent of the disk changed before each incremental point
IOPS_GOAL, P99_GOAL, BYTES_TOL = 1.0, 1.0, 0.05
TICK = os.sysconf('SC_CLK_TCK')
TOOLS = ('qemu-img', 'qemu-io', 'fio', 'qemu-storage-daemon', 'cp')

def cpu_s(pid):
    """utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK

def fresh_copy(src, dst):
    rm(dst)
    check(['cp', '--sparse=always', src, dst], 'copying the source')
    fsync(dst)

def med(xs):
    return statistics.median(xs)

def mm(xs, f='{:.2f}'):
    return (f + '-' + f).format(min(xs), max(xs))

# ------------------------------------------------------------------ servers

class Server:
    """bmirror serve or qemu-storage-daemon exporting `work` (raw) over NBD at self.uri."""
    def __init__(self, kind, args, d, work, track=False):
        self.kind, self.d, self.work, self.size = kind, d, work, os.path.getsize(work)
        self.nbd, self.ctl = os.path.join(d, kind + '.nbd'), os.path.join(d, kind + '.ctl')
        if kind == 'bmirror':
            self.args = args
            self.daemon = Daemon([args.bmirror, 'serve', '-f', 'raw', '--nbd', 'unix:' + self.nbd,
                                  '--control', self.ctl] + (['--track'] if track else []) + [work],
                                 d, 'serve', [self.nbd, self.ctl])
            self.uri = f'nbd+unix:///?socket={self.nbd}'
        else:
            self.daemon = Daemon(['qemu-storage-daemon',
                                  '--blockdev', f'driver=file,node-name=disk-file,filename={work},'
                                                'aio=io_uring,cache.direct=on',
                                  '--blockdev', 'driver=raw,node-name=disk,file=disk-file',
                                  '--nbd-server', f'addr.type=unix,addr.path={self.nbd}',
                                  '--export', 'type=nbd,id=export,node-name=disk,name=disk,writable=on',
                                  '--chardev', f'socket,id=qmp,path={self.ctl},server=on,wait=off',
                                  '--monitor', 'chardev=qmp'], d, 'qsd', [self.nbd, self.ctl])
            self.qmp = Qmp(self.ctl, self.daemon)
            self.uri = f'nbd+unix:///disk?socket={self.nbd}'
        self.pid = self.daemon.p.pid

    def add_file(self, node, path, fmt, **extra):
        """QSD: open an image as node `node` (O_DIRECT, io_uring, like the disk)."""
        self.qmp.cmd('blockdev-add', driver='file', filename=path, aio='io_uring', cache={'direct': True},
                     **{'node-name': node + '-file'})
        self.qmp.cmd('blockdev-add', driver=fmt, file=node + '-file', **{'node-name': node}, **extra)

    def qsd_job(self, name, command, **arguments):
        """QSD: run a block job command and wait for its end: (seconds from the command, event data)."""
        self.qmp.events.clear()
        t = time.perf_counter()
        self.qmp.cmd(command, **arguments)
        while True:
            done = self.qmp.wait_event('BLOCK_JOB_COMPLETED')
            if done.get('device') == name:
                break
            self.qmp.events.clear()
        wall = time.perf_counter() - t
        if 'error' in done:
            raise Failed(self.daemon.cmd, self.daemon.stderr(), f'{command} failed: {done["error"]}')
        return wall, done

    def stop(self):
        self.daemon.stop()

# ------------------------------------------------------------------ part 1: snapshot

def fio(args, uri, out):
    """fio 4 KiB random writes, qd16, over NBD: ramp --warmup s, measure --seconds s."""
    cmd = ['fio', '--name=guest', '--ioengine=nbd', '--uri=' + uri, '--rw=randwrite', '--bs=4k', '--iodepth=16',
           '--size=100%', '--time_based', f'--ramp_time={args.warmup}', f'--runtime={args.seconds}',
           '--randrepeat=0', '--output-format=json', '--output=' + out]
    wall, _ = speed.timed(cmd)
    with open(out) as f:
        job = json.load(f)['jobs'][0]
    if job['error']:
        raise Failed(cmd, '', f'fio failed, error {job["error"]}')
    w = job['write']
    return {'iops': w['iops'], 'p99_ms': w['clat_ns']['percentile']['99.000000'] / 1e6,
            'mean_ms': w['clat_ns']['mean'] / 1e6, 'fio_wall_s': wall}

def guest_phase(args, srv, out):
    c0 = cpu_s(srv.pid)
    r = fio(args, srv.uri, out)
    r['server_cpu_s'] = cpu_s(srv.pid) - c0
    return r

def snapshot_qsd(srv, scratch):
    """Replace the disk's export by one of a copy-before-write filter over it, and export the view."""
    with open(scratch, 'wb') as f:
        f.truncate(srv.size)
    srv.qmp.events.clear()
    srv.qmp.cmd('block-export-del', id='export')
    srv.qmp.wait_event('BLOCK_EXPORT_DELETED')
    srv.add_file('scratch', scratch, 'raw')
    srv.qmp.cmd('blockdev-add', driver='copy-before-write', file='disk', target='scratch',
                **{'node-name': 'cbw', 'on-cbw-error': 'break-snapshot', 'cbw-timeout': 1})
    srv.qmp.cmd('blockdev-add', driver='snapshot-access', file='cbw', **{'node-name': 'snap'})
    srv.qmp.cmd('block-export-add', type='nbd', id='export', name='disk', writable=True, **{'node-name': 'cbw'})
    srv.qmp.cmd('block-export-add', type='nbd', id='snap', name='snap', **{'node-name': 'snap'})

def snap_run(args, d, src, kind):
    work, scratch = os.path.join(d, 'snap-disk.raw'), os.path.join(d, 'qsd-scratch.raw')
    fresh_copy(src, work)
    rm(scratch)
    srv = Server(kind, args, d, work)
    out = os.path.join(d, 'fio.json')
    try:
        r = {'none': guest_phase(args, srv, out)}
        if kind == 'bmirror':
            check([args.bmirror, 'snapshot', '--control', srv.ctl, '--scratch-dir', d, '--json'],
                  'bmirror snapshot failed')
        else:
            snapshot_qsd(srv, scratch)
        r['snap'] = guest_phase(args, srv, out)
        if kind == 'bmirror':
            snaps = json.loads(check([args.bmirror, 'snapshot', '--control', srv.ctl, '--list', '--json'],
                                     'bmirror snapshot --list failed'))
            s = snaps[0] if isinstance(snaps, list) else snaps.get('snapshots', [snaps])[0]
            r['snap'].update(state=s['state'], scratch_bytes=s['bytes_saved'], cbw_count=s['cbw_count'],
                             cbw_max_us=s['cbw_max_us'])
        else:   # a broken snapshot-access view fails its reads
            ok = subprocess.run(['qemu-io', '-r', '-f', 'raw', '-c', 'read 0 64k',
                                 f'nbd+unix:///snap?socket={srv.nbd}'], capture_output=True).returncode == 0
            r['snap'].update(state='active' if ok else 'broken', scratch_bytes=os.stat(scratch).st_blocks * 512)
    finally:
        srv.stop()
        rm(work, scratch)
    return r

def bench_snap(args, d, src, out):
    print(f'snap: {human(args.size)} raw disk, fio 4k randwrite qd16 over NBD, {args.warmup} s ramp + '
          f'{args.seconds} s; (a) no snapshot, (b) right after one', flush=True)
    runs = {'bmirror': [], 'qsd': []}
    for run in range(args.runs):
        for kind in rotate(['bmirror', 'qsd'], run):
            r = snap_run(args, d, src, kind)
            runs[kind].append(r)
            a, b = r['none'], r['snap']
            print(f'    run {run + 1}: {kind:8} none {a["iops"]:8.0f} IOPS p99 {a["p99_ms"]:6.2f} ms cpu '
                  f'{a["server_cpu_s"]:5.2f} s | snapshot {b["iops"]:8.0f} IOPS p99 {b["p99_ms"]:6.2f} ms cpu '
                  f'{b["server_cpu_s"]:5.2f} s scratch {b["scratch_bytes"] / MiB:6.0f} MiB {b["state"]}', flush=True)
    out['snap'] = runs
    bm, q = runs['bmirror'], runs['qsd']
    rows = []
    for phase, label in (('none', 'no snapshot'), ('snap', 'after snapshot')):
        for kind, rs in (('bmirror', bm), ('QSD', q)):
            xs = [r[phase] for r in rs]
            rows.append([label, kind, f'{med(x["iops"] for x in xs):.0f}', mm([x['iops'] for x in xs], '{:.0f}'),
                         f'{med(x["p99_ms"] for x in xs):.2f}', mm([x['p99_ms'] for x in xs]),
                         f'{med(x["server_cpu_s"] for x in xs):.2f}', f'{med(x["fio_wall_s"] for x in xs):.2f}',
                         f'{med(x["server_cpu_s"] / (x["iops"] * args.seconds) * 1e6 for x in xs):.1f}'])
        i = [b[phase]['iops'] / x[phase]['iops'] for b, x in zip(bm, q)]
        p = [b[phase]['p99_ms'] / x[phase]['p99_ms'] for b, x in zip(bm, q)]
        rows.append([label, 'bmirror/QSD', f'{med(i):.2f}', mm(i), f'{med(p):.2f}', mm(p), '', '', ''])
        if phase == 'snap':
            goal(out, 'snapshot: guest IOPS bmirror/QSD', med(i), IOPS_GOAL, '>=', f'min-max {mm(i)}')
            goal(out, 'snapshot: guest p99 bmirror/QSD', med(p), P99_GOAL, '<=', f'min-max {mm(p)}')
        else:
            goal(out, 'no snapshot: guest IOPS bmirror/QSD', med(i), IOPS_GOAL, '>=', f'min-max {mm(i)}')
    out['tables']['snap'] = (['phase', 'system', 'IOPS', 'min-max', 'p99 ms', 'min-max', 'srv CPU s',
                              'wall s', 'CPU us/write'], rows)

# ------------------------------------------------------------------ part 2: incremental backups

def change_list(size, pct, seed):
    """64 KiB-aligned extents (64 KiB to 1 MiB) at random until `pct` % of the chunks are covered:
    ([(offset, length)], set of chunks)."""
    rnd, chunks, writes = random.Random(seed), set(), []
    n, want = size // CHUNK, size // CHUNK * pct // 100
    while len(chunks) < want:
        c = rnd.randrange(n)
        k = min(rnd.randint(1, 16), n - c, want - len(chunks) + 1)
        writes.append((c * CHUNK, k * CHUNK))
        chunks.update(range(c, c + k))
    return writes, chunks

def apply_changes(uri, writes, pattern):
    # Then a flush, as a guest's filesystem would: the point starts from
    # durable data on both systems (bmirror flushes the disk before a
    # point's manifest, and would otherwise time the write-back too).
    script = ''.join(f'write -P {pattern} {o} {n}\n' for o, n in writes) + 'flush\n'
    r = subprocess.run(['qemu-io', '-f', 'raw', uri], input=script, capture_output=True, text=True)
    if r.returncode != 0 or 'error' in r.stdout.lower() or 'failed' in r.stdout.lower():
        raise Failed(['qemu-io', '-f', 'raw', uri], r.stdout[-3000:] + r.stderr, 'writing the changes failed')

def incr_bmirror(args, srv, bdir, kind_incremental):
    c0 = cpu_s(srv.pid)
    cmd = [args.bmirror, 'backup', '--control', srv.ctl, '--to', bdir, '--json'] + \
          (['--incremental'] if kind_incremental else [])
    t = time.perf_counter()
    res = json.loads(check(cmd, 'bmirror backup failed').strip().splitlines()[-1])
    return {'s': time.perf_counter() - t, 'server_cpu_s': cpu_s(srv.pid) - c0, 'bytes_read': res['bytes_read'],
            'bytes_changed': res['bytes_changed'], 'bytes_written': res['bytes_written'],
            'elapsed_s': res['elapsed_s'], 'healed': res['healed'], 'file': res['file']}

def incr_qsd(srv, d, point, prev):
    """A full (prev None) or incremental blockdev-backup into a new qcow2 target."""
    target = os.path.join(d, f'qsd-{point}.qcow2')
    rm(target)
    check(['qemu-img', 'create', '-q', '-f', 'qcow2'] + (['-b', prev, '-F', 'qcow2'] if prev else []) +
          [target, str(srv.size)], 'making the QSD target')
    node = f'point{point}'
    srv.add_file(node, target, 'qcow2', **({'backing': None} if prev else {}))
    c0 = cpu_s(srv.pid)
    if prev:
        wall, done = srv.qsd_job(node, 'blockdev-backup', device='disk', target=node, sync='incremental',
                                 bitmap='bm0', **{'job-id': node})
    else:   # the bitmap starts at the full backup's instant
        wall, done = srv.qsd_job(node, 'transaction', actions=[
            {'type': 'block-dirty-bitmap-add', 'data': {'node': 'disk', 'name': 'bm0', 'granularity': CHUNK}},
            {'type': 'blockdev-backup', 'data': {'job-id': node, 'device': 'disk', 'target': node, 'sync': 'full'}}])
    cpu = cpu_s(srv.pid) - c0
    t = time.perf_counter()
    fsync(target)
    return {'s': wall, 'fsync_s': time.perf_counter() - t, 'server_cpu_s': cpu, 'bytes_job': done['len'],
            'file': target}

def incr_run(args, d, src, kind, run, keep):
    work, bdir = os.path.join(d, 'incr-disk.raw'), os.path.join(d, f'points-{kind}-{run}')
    fresh_copy(src, work)
    shutil.rmtree(bdir, ignore_errors=True)
    os.makedirs(bdir)
    srv = Server(kind, args, d, work, track=True)
    points, prev = [], None
    try:
        for i, pct in enumerate((0,) + PCTS):
            if pct:
                writes, chunks = change_list(args.size, pct, seed=run * 100 + pct)
                apply_changes(srv.uri, writes, pattern=0x10 + i)
            r = incr_bmirror(args, srv, bdir, bool(pct)) if kind == 'bmirror' else incr_qsd(srv, bdir, i + 1, prev)
            prev = r['file']
            if pct:
                r.update(pct=pct, changed_bytes=len(chunks) * CHUNK, written_bytes=sum(n for _, n in writes))
            else:
                r['pct'] = 0
            points.append(r)
    finally:
        srv.stop()
    check(['qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', work, prev],
          f'{kind}: the newest point differs from the disk')
    if kind == 'qsd':
        check(['qemu-img', 'check', '-q', prev], f'{kind}: the newest point is damaged')
    rm(work)
    if not keep:
        shutil.rmtree(bdir, ignore_errors=True)
    return points, bdir

def bench_incr(args, d, src, out):
    print(f'incr: {human(args.size)} raw disk; a full point, then {", ".join(f"{p}%" for p in PCTS)} changed '
          f'before each incremental point', flush=True)
    runs, chain = {'bmirror': [], 'qsd': []}, None
    for run in range(args.runs):
        for kind in rotate(['bmirror', 'qsd'], run):
            pts, bdir = incr_run(args, d, src, kind, run, keep=(run == 0 and kind == 'bmirror'))
            if run == 0 and kind == 'bmirror':
                chain = bdir
            runs[kind].append(pts)
            print(f'    run {run + 1}: {kind:8} ' + '  '.join(
                f'{p["pct"] or "full"}{"%" if p["pct"] else ""} {p["s"]:6.3f} s' for p in pts), flush=True)
    out['incr'] = runs
    rows = []
    for i, pct in enumerate((0,) + PCTS):
        bm = [r[i] for r in runs['bmirror']]
        q = [r[i] for r in runs['qsd']]
        t = [b['s'] / x['s'] for b, x in zip(bm, q)]
        prec = [b['bytes_read'] / b['changed_bytes'] for b in bm] if pct else None
        rows.append([f'{pct}%' if pct else 'full', f'{med(b["s"] for b in bm):.3f}', mm([b['s'] for b in bm], '{:.3f}'),
                     f'{med(x["s"] for x in q):.3f}', mm([x['s'] for x in q], '{:.3f}'), f'{med(t):.2f}', mm(t),
                     f'{med(b["server_cpu_s"] for b in bm):.2f}', f'{med(x["server_cpu_s"] for x in q):.2f}',
                     f'{bm[0]["changed_bytes"] / MiB:.1f}' if pct else '-',
                     f'{med(b["bytes_read"] for b in bm) / MiB:.1f}', f'{med(x["bytes_job"] for x in q) / MiB:.1f}',
                     f'{med(prec):.3f}' if prec else '-'])
        goal(out, f'backup {pct}% changed: time bmirror/QSD' if pct else 'full backup: time bmirror/QSD',
             med(t), 1.0, '<=', f'min-max {mm(t)}; lower is better')
        if pct:
            goal(out, f'backup {pct}% changed: bmirror bytes_read / changed', med(prec), BYTES_TOL, '~',
                 f'min-max {mm(prec, "{:.3f}")}; QSD job / changed '
                 f'{med(x["bytes_job"] / x["changed_bytes"] for x in q):.3f}')
    out['tables']['incr'] = (['point', 'bmirror s', 'min-max', 'QSD s', 'min-max', 'bm/QSD', 'min-max',
                              'bm CPU s', 'QSD CPU s', 'changed MiB', 'bm read MiB', 'QSD job MiB',
                              'bm read/changed'], rows)
    return chain

# ------------------------------------------------------------------ part 3: restore

def bench_restore(args, d, chain, out):
    rdir, dst = os.path.join(d, 'restore-points'), os.path.join(d, 'restored.raw')
    os.makedirs(rdir)
    for name in sorted(os.listdir(chain)):     # points 1-3: the newest is a full + 2 incrementals
        if name[:4].isdigit() and int(name[:4]) <= 3:
            os.link(os.path.join(chain, name), os.path.join(rdir, name))
    point = os.path.join(rdir, '0003.qcow2')
    print(f'restore: point 3 (full + 2 incrementals) of a {human(args.size)} disk to raw', flush=True)
    systems = {'bmirror': [args.bmirror, 'backup', 'restore', rdir, '--to', dst],
               'qemu-img': ['qemu-img', 'convert', '-O', 'raw', point, dst],
               'qemu-img -W -m 16': ['qemu-img', 'convert', '-W', '-m', '16', '-O', 'raw', point, dst]}
    runs = {s: [] for s in systems}
    try:
        for run in range(args.runs):
            for name in rotate(list(systems), run):
                rm(dst)
                wall, cpu = speed.timed(systems[name], [dst])
                check(['qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', dst, point], f'{name}: the restore differs')
                runs[name].append({'s': wall, 'cpu_s': cpu, 'mib_s': args.size / MiB / wall})
                print(f'    run {run + 1}: {name:17} {wall:7.3f} s  {args.size / MiB / wall:7.0f} MiB/s  '
                      f'cpu {cpu:6.3f} s', flush=True)
    finally:
        rm(dst)
    out['restore'] = runs
    bm, rows = runs['bmirror'], []
    for name, rs in runs.items():
        ratio = [b['mib_s'] / r['mib_s'] for b, r in zip(bm, rs)]
        rows.append([name, f'{med(r["mib_s"] for r in rs):.0f}', mm([r['mib_s'] for r in rs], '{:.0f}'),
                     f'{med(r["s"] for r in rs):.3f}', f'{med(r["cpu_s"] for r in rs):.3f}',
                     '' if name == 'bmirror' else f'{med(ratio):.2f}', '' if name == 'bmirror' else mm(ratio)])
        if name != 'bmirror':
            goal(out, f'restore: MiB/s bmirror/{name}', med(ratio), 1.0, '>=', f'min-max {mm(ratio)}')
    out['tables']['restore'] = (['system', 'MiB/s', 'min-max', 'wall s', 'CPU s', 'bm/this', 'min-max'], rows)

# ------------------------------------------------------------------ main

def report(out):
    titles = {'snap': 'Guest writes while a snapshot exists (IOPS, p99 completion latency; CPU of the server '
                      'over the fio phase, and per measured write)',
              'incr': 'Backups: seconds per point (bmirror: the command; QSD: QMP command to BLOCK_JOB_COMPLETED); '
                      'bm/QSD < 1: bmirror faster',
              'restore': 'Restore of point 3 to raw (MiB/s of the disk size, fsync included); bm/this > 1: '
                         'bmirror faster'}
    for part, title in titles.items():
        if part in out['tables']:
            print('\n' + title)
            table(*out['tables'][part])
    if out['goals']:
        print('\nGoals')
        table(['figure', 'value', 'goal', 'met', 'detail'],
              [[g['figure'], '-' if g['value'] is None else f'{g["value"]:.3f}', g['goal'],
                {True: 'yes', False: 'NO', None: '?'}[g['met']], g['detail']] for g in out['goals']])
    for f in out['failures']:
        print(f'FAILED: {f["case"]}')

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--only', default='snap,incr,restore', help='parts to run (default: all)')
    ap.add_argument('--size', type=speed.parse_size, default=GiB, help='disk size (default 1G)')
    ap.add_argument('--runs', type=int, default=5, help='runs of each case (default 5)')
    ap.add_argument('--quick', action='store_true', help='a smoke test: 256M disk, 2 runs, 2 s of fio')
    ap.add_argument('--seconds', type=float, default=5, help='seconds of fio measured per phase (default 5)')
    ap.add_argument('--warmup', type=float, default=1, help='seconds of fio ramp before them (default 1)')
    speed.add_common_options(ap)
    args = ap.parse_args()
    if args.quick:
        args.size, args.runs, args.seconds = 256 * MiB, 2, 2
    args.bmirror = os.path.abspath(args.bmirror)
    parts = args.only.split(',')
    if set(parts) - {'snap', 'incr', 'restore'} or args.runs < 1 or args.size < 16 * MiB or args.size % CHUNK:
        ap.error('--only takes snap,incr,restore; --runs >= 1; --size >= 16M, a multiple of 64K')
    missing = [t for t in TOOLS if not shutil.which(t)]
    if not os.access(args.bmirror, os.X_OK):
        missing.insert(0, f'bmirror ({args.bmirror}: build it, or give --bmirror)')
    if missing:
        sys.exit('bench/backup.py: missing: ' + ', '.join(missing) +
                 '\n  (qemu-img and qemu-io: qemu-utils; qemu-storage-daemon: qemu-system-common; fio: fio)')
    built = time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(os.stat(args.bmirror).st_mtime))
    qsd = subprocess.run(['qemu-storage-daemon', '--version'], capture_output=True, text=True).stdout.split('\n')[0]
    print(f'bench/backup.py: {args.bmirror} (built {built} UTC) against {qsd}; size {human(args.size)}, '
          f'{args.runs} runs, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}', flush=True)
    d = tempfile.mkdtemp(prefix='bmirror-backup-', dir=args.dir)
    out = {'args': vars(args), 'bmirror_built': built, 'qsd': qsd, 'chunk': CHUNK,
           'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'goals': [], 'failures': [], 'tables': {}}
    try:
        src = os.path.join(d, 'source.raw')
        pick = random.Random(1)
        speed.write_extents(src, args.size, [i * MiB for i in range(args.size // MiB) if pick.random() < 0.75], 2)
        chain = None
        for part in ('snap', 'incr', 'restore'):
            if part not in parts:
                continue
            try:
                if part == 'snap':
                    bench_snap(args, d, src, out)
                elif part == 'incr':
                    chain = bench_incr(args, d, src, out)
                elif chain:
                    bench_restore(args, d, chain, out)
                else:
                    print('restore: skipped, it restores the chain that incr makes')
            except Failed as e:
                print(f'{part}: FAILED, {e}', flush=True)
                out['failures'].append({'case': part, 'error': str(e)})
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        out['failures'].append({'case': 'all', 'error': 'interrupted'})
    finally:
        speed.clean_up(args, d)
    report(out)
    return speed.save(args, out)

if __name__ == '__main__':
    sys.exit(main())
