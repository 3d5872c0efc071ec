#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""bench/speed.py: every speed figure of bmirror, as ratios against its peers, from one run.

  python3 bench/speed.py                              # everything: 1 GiB disks, 5 runs
  python3 bench/speed.py --only copy --formats raw,nbd --size 256M --runs 3 --json out.json

Parts (--only copy,move,sparse,steady; all by default):
  copy    `bmirror copy` against `qemu-img convert -W -m 16` and, where both sides
          are raw files or NBD, `nbdcopy`; for raw->raw also fio writing the same
          number of data bytes sequentially with O_DIRECT to a new file (what the
          disk can take; timed by fio's own clock, so its start-up is left out).
          Cases: raw->raw, raw->qcow2, qcow2->raw, qcow2->qcow2, raw->vhdx,
          vhdx->raw, raw->NBD (qemu-nbd, and nbdkit's file plugin with its
          default cache), NBD (qemu-nbd -r)->raw.
  steady  raw->raw with bmirror alone, N times (--steady N, default 10).
  sparse  a sparse raw disk (--sparse-size, default 1T) holding --size of data in
          1 MiB extents spread evenly over it, copied to raw and to qcow2, against a
          disk of just --size holding the same extents; then each disk moved
          (serve + move, no guest), with serve's peak RSS for the sparse one.
  move    a live move under a guest: fio writing 4 KiB blocks at random, queue
          depth 16, over NBD, for --warmup seconds and then during the move.
          `bmirror serve` + `bmirror move --mode active` (timed from its start to its
          exit, the pivot done) against qemu-storage-daemon exporting the disk and
          running blockdev-mirror, copy-mode write-blocking, over QMP (timed from the
          command to BLOCK_JOB_COMPLETED; its target is made beforehand).  Raw, qcow2
          and VHDX disks.  Guest IOPS and max completion latency come from fio's
          100 ms logs (log_max_value) over the move; the bytes the move copied are
          set against `bmirror copy --json`'s bytes of the source as it was
          left at the pivot, and, for the goal, those of a move with no guest
          against a copy of the same source; serve's peak RSS is its VmHWM.

How: the source disk has 75% of its 1 MiB extents filled with seeded random data,
the rest holes; qcow2 and VHDX sources are converted from it by qemu-img.  It is
written and fsynced once, before any timing, and reused by every run (a move works
on a fresh copy of it).  Each run removes the destination, runs every system once
in an order rotated from run to run, and checks each copy with `qemu-img compare`
(each moved qcow2/VHDX with `qemu-img check`), untimed.  The timed part is the
child process plus an fsync of the destination file (for NBD targets the served
file), the same for every system.  Ratios are paired within a run (peer time /
bmirror time: above 1 means bmirror is faster); the table gives the median and
min-max over --runs.  CPU time is the user+sys time of the timed child (os.wait4),
per GiB of the disk's data; NBD servers' CPU is not counted (all use the same
one).  A failure (non-zero exit, a copy that differs) stops its case with the
command and its stderr, the other cases go on, and the script exits 1.

Goals (reported, never asserted):
  steadiness    bmirror's slowest / fastest copy of a case          <= 1.2
  sparse        time of the sparse disk / time of the dense one     <= 1.10
  move time     bmirror / qemu-storage-daemon                       <= 0.7
  guest IOPS    during the move, bmirror / qemu-storage-daemon      >= 2
  guest latency max completion latency during bmirror's move        <= 10 ms
  move bytes    data a move's bulk copy wrote with no guest / what `bmirror
                copy` of the same disk writes                       within 5%
  memory        bmirror serve's peak RSS   <= 64 MiB + 2 MiB per TiB of disk

Needs python3 (stdlib only) and qemu-utils; the peers come from libnbd-bin
(nbdcopy), nbdkit, fio and qemu-system-common (qemu-storage-daemon).  A peer that
is not installed is named and its rows skipped.
"""
import argparse, json, os, random, shlex, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
LOG_MS = 100          # fio log window (ms) for the guest's IOPS and max latency
LIVE = []             # background processes we started; ended in main()'s finally
STEADY_GOAL, SPARSE_GOAL, MOVE_GOAL, IOPS_GOAL, LAT_GOAL_MS, BYTES_TOL = 1.2, 1.10, 0.7, 2.0, 10.0, 0.05

class Failed(Exception):
    """A system failed: the command, why, and what it printed on stderr."""
    def __init__(self, cmd, stderr, why):
        lines = stderr.strip().splitlines()[-30:] or ['(it printed nothing on stderr)']
        super().__init__(f'{why}: {shlex.join(map(str, cmd))}\n' + ''.join(f'    | {l}\n' for l in lines))

def parse_size(s):
    units = {'K': 1 << 10, 'M': MiB, 'G': GiB, 'T': TiB}
    s = s.strip().upper().rstrip('B').rstrip('I')
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)

def human(n):
    for unit, v in (('T', TiB), ('G', GiB), ('M', MiB)):
        if n >= v and n % v == 0:
            return f'{n // v}{unit}'
    return f'{n / MiB:.0f}M'

def fsync(path):
    with open(path, 'rb') as f:
        os.fsync(f.fileno())

def rm(*paths):
    for p in paths:
        if os.path.lexists(p):
            os.unlink(p)

def check(cmd, why='failed'):
    """Run an untimed helper command; its stdout, or Failed."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(cmd, r.stdout + r.stderr, f'{why} (exit status {r.returncode})')
    return r.stdout

def timed(cmd, sync=()):
    """Run cmd to its end, then fsync the `sync` files: (wall seconds, CPU seconds of cmd)."""
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise Failed(cmd, err.read().decode(errors='replace'), f'exit status {p.returncode}')
        for f in sync:
            fsync(f)
        return time.perf_counter() - t, ru.ru_utime + ru.ru_stime

class Daemon:
    """A background process (NBD server, qemu-storage-daemon, fio) logging stderr to a file."""
    def __init__(self, cmd, d, name, wait=()):
        self.cmd, self.log = cmd, os.path.join(d, name + '.log')
        rm(*wait)
        with open(self.log, 'w') as log:
            self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        LIVE.append(self)
        end = time.time() + 30
        while not all(os.path.exists(w) for w in wait):
            if self.p.poll() is not None or time.time() > end:
                self.stop()
                raise Failed(cmd, self.stderr(), 'did not start')
            time.sleep(0.01)

    def stderr(self):
        with open(self.log, errors='replace') as f:
            return f.read()[-6000:]

    def stop(self, sig=signal.SIGTERM):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self in LIVE:
            LIVE.remove(self)
        return self.p.returncode

def nbd_server(kind, path, d, readonly=False):
    """Export the raw file `path` on a unix socket: (Daemon, URI)."""
    sock = os.path.join(d, kind + '.sock')
    if kind == 'qemu-nbd':
        cmd = ['qemu-nbd', '-f', 'raw', '--socket=' + sock, '--persistent', '-x', 'disk',
               '--cache=none', '--aio=io_uring'] + (['-r'] if readonly else []) + [path]
        return Daemon(cmd, d, kind, [sock]), f'nbd+unix:///disk?socket={sock}'
    cmd = ['nbdkit', '--foreground', '--exit-with-parent', '--unix', sock] + \
          (['--readonly'] if readonly else []) + ['file', 'file=' + path]
    return Daemon(cmd, d, kind, [sock]), f'nbd+unix:///?socket={sock}'

# ------------------------------------------------------------------ source disks

def write_extents(path, size, offsets, seed):
    """A sparse file of `size` with 1 MiB of seeded random data at each offset, synced."""
    rnd = random.Random(seed)
    with open(path, 'wb') as f:
        f.truncate(size)
        for off in offsets:
            f.seek(off)
            f.write(rnd.randbytes(MiB))
        f.flush()
        os.fsync(f.fileno())

class Sources:
    """The source disk in each format, made on first use: path and bytes of data."""
    def __init__(self, d, size):
        self.d, self.size, self.made = d, size, {}
        pick = random.Random(1)
        self.offsets = [i * MiB for i in range(size // MiB) if pick.random() < 0.75]
        self.data = len(self.offsets) * MiB

    def get(self, fmt):
        path = os.path.join(self.d, 'source.' + fmt)
        if fmt not in self.made and fmt == 'raw':
            write_extents(path, self.size, self.offsets, seed=2)
        elif fmt not in self.made:
            check(['qemu-img', 'convert', '-f', 'raw', '-O', fmt, self.get('raw'), path], 'making the source')
            fsync(path)
        self.made[fmt] = path
        return path

# ------------------------------------------------------------------ copy

CASES = [('raw', 'raw'), ('raw', 'qcow2'), ('qcow2', 'raw'), ('qcow2', 'qcow2'), ('raw', 'vhdx'),
         ('vhdx', 'raw'), ('raw', 'nbd:qemu-nbd'), ('raw', 'nbd:nbdkit'), ('nbd:qemu-nbd', 'raw')]

def rotate(names, run):
    return names[run % len(names):] + names[:run % len(names)]

def spread(xs):
    return {'median': statistics.median(xs), 'min': min(xs), 'max': max(xs)}

def copy_case(args, d, src, dst_kind, src_kind, data, have):
    """Every system copies src once per run; {system: [(wall, cpu), ...]}."""
    sf, df = ('raw' if k.startswith('nbd') else k for k in (src_kind, dst_kind))
    dst = os.path.join(d, 'copy.' + df)
    systems = ['bmirror', 'qemu-img'] + [p for p, fits in (('nbdcopy', sf == df == 'raw'),  # files or NBD
                                                           ('fio', src_kind == dst_kind == 'raw')) if fits and p in have]
    res, fio_out = {s: [] for s in systems}, os.path.join(d, 'fio-baseline.json')
    src_srv, src_addr = nbd_server('qemu-nbd', src, d, readonly=True) if src_kind.startswith('nbd') else (None, src)
    try:
        for run in range(args.runs):
            for name in rotate(systems, run):
                target, srv, dst_addr = dst, None, dst
                if name == 'fio':
                    target = os.path.join(d, 'fio-baseline.dat')
                rm(target)
                if dst_kind.startswith('nbd') or name == 'nbdcopy':
                    with open(dst, 'wb') as f:
                        f.truncate(args.size)
                if dst_kind.startswith('nbd'):
                    srv, dst_addr = nbd_server(dst_kind[4:], dst, d)
                cmd = {'bmirror': [args.bmirror, 'copy', '-f', sf, '-O', df, src_addr, dst_addr],
                       'qemu-img': ['qemu-img', 'convert', '-W', '-m', '16', '-f', sf, '-O', df] +
                                   (['-n'] if srv else []) + [src_addr, dst_addr],
                       'nbdcopy': ['nbdcopy', src_addr, dst_addr],
                       'fio': ['fio', '--name=baseline', '--filename=' + target, '--rw=write', '--bs=1M',
                               f'--size={data}', '--direct=1', '--ioengine=io_uring', '--iodepth=16',
                               '--fallocate=none', '--end_fsync=1', '--output-format=json', '--output=' + fio_out]}[name]
                try:
                    wall, cpu = timed(cmd, [target])
                finally:
                    if srv:
                        srv.stop()
                if name == 'fio':   # fio's own clock (end_fsync included): its ~0.4 s start-up is left out
                    with open(fio_out) as f:
                        job = json.load(f)['jobs'][0]
                    wall = job['job_runtime'] / 1000
                    cpu = (job['usr_cpu'] + job['sys_cpu']) / 100 * wall
                else:
                    check(['qemu-img', 'compare', '-U', '-f', sf, '-F', df, src, dst],
                          f'{name}: the copy differs from its source, or compare failed')
                res[name].append((wall, cpu))
                print(f'    run {run + 1}: {name:8} {wall:8.3f} s  cpu {cpu:7.3f} s', flush=True)
    finally:
        if src_srv:
            src_srv.stop()
        rm(dst, os.path.join(d, 'fio-baseline.dat'))
    return res

def bench_copy(args, d, srcs, have, out):
    fmts = set(args.formats.split(','))
    label = lambda k: f'nbd({k[4:]})' if k.startswith('nbd:') else k
    for src_kind, dst_kind in CASES:
        case = f'{label(src_kind)}->{label(dst_kind)}'
        # the case's format: raw for raw->raw, else its other side (qcow2, vhdx or nbd)
        kind = {k.split(':')[0] for k in (src_kind, dst_kind)} - {'raw'} or {'raw'}
        if not kind <= fmts:
            continue
        need = {k[4:] for k in (src_kind, dst_kind) if k.startswith('nbd:')} - have
        if need:
            skip(out, 'copy ' + case, f'{", ".join(sorted(need))} is not installed')
            continue
        print(f'copy {case}:', flush=True)
        try:
            src = srcs.get('raw' if src_kind.startswith('nbd') else src_kind)
            res = copy_case(args, d, src, dst_kind, src_kind, srcs.data, have)
        except Failed as e:
            fail(out, 'copy ' + case, e)
            continue
        bm = res['bmirror']
        gib = srcs.data / GiB
        for peer, times in res.items():
            if peer == 'bmirror':
                continue
            ratios = [p[0] / b[0] for p, b in zip(times, bm)]
            out['copy'].append({'case': case, 'peer': 'fio O_DIRECT write' if peer == 'fio' else peer,
                                'ratio': spread(ratios),
                                'bmirror_s': statistics.median(b[0] for b in bm),
                                'peer_s': statistics.median(p[0] for p in times),
                                'bmirror_cpu_s_per_gib': statistics.median(b[1] for b in bm) / gib,
                                'peer_cpu_s_per_gib': statistics.median(p[1] for p in times) / gib,
                                'runs': {'bmirror': bm, peer: times}})
        walls = [b[0] for b in bm]
        goal(out, f'copy {case}: bmirror slowest/fastest', max(walls) / min(walls), STEADY_GOAL, '<=')

def skip(out, case, why):
    print(f'{case}: skipped, {why}')
    out['skipped'].append(f'{case} ({why})')

def fail(out, case, e):
    print(f'{case}: FAILED, {e}')
    out['failures'].append({'case': case, 'error': str(e)})

def goal(out, what, value, target, how, detail=''):
    """One figure with its goal: `how` is '<=', '>=' or '~' (within a fraction of 1)."""
    if value is None:
        met = None
    elif how == '~':
        met = abs(value - 1) <= target
    else:
        met = value <= target if how == '<=' else value >= target
    out['goals'].append({'figure': what, 'value': value, 'goal': f'{how} {target:.4g}' if how != '~'
                         else f'1 +- {target:.0%}', 'met': met, 'detail': detail})

# ------------------------------------------------------------------ steady, sparse

def bench_steady(args, d, srcs, out):
    n = args.steady or 10
    src, dst = srcs.get('raw'), os.path.join(d, 'steady.raw')
    print(f'steady: raw->raw, bmirror alone, {n} runs', flush=True)
    walls = []
    try:
        for _ in range(n):
            rm(dst)
            walls.append(timed([args.bmirror, 'copy', '-f', 'raw', '-O', 'raw', src, dst], [dst])[0])
            print(f'    run {len(walls)}: bmirror  {walls[-1]:8.3f} s', flush=True)
            check(['qemu-img', 'compare', '-f', 'raw', '-F', 'raw', src, dst], 'the copy differs')
    except Failed as e:
        return fail(out, 'steady', e)
    finally:
        rm(dst)
    out['steady'] = walls
    goal(out, f'steady raw->raw x{n}: slowest/fastest', max(walls) / min(walls), STEADY_GOAL, '<=',
         f'{min(walls):.3f}-{max(walls):.3f} s')

def bench_sparse(args, d, out):
    big, data = args.sparse_size, args.size
    n = data // MiB
    sparse, dense = os.path.join(d, 'sparse.raw'), os.path.join(d, 'dense.raw')
    st = os.statvfs(d)   # what df shows: the sparse and dense disks and their copies need ~4x the data
    if st.f_bavail * st.f_frsize < 5 * data:
        return skip(out, 'sparse', f'{human(st.f_bavail * st.f_frsize)} free in {d}, needs {human(5 * data)}')
    try:
        write_extents(sparse, big, [i * (big // n // MiB * MiB) for i in range(n)], seed=3)
        if os.stat(sparse).st_blocks * 512 > 2 * data:
            raise OSError('the file system filled its holes')
    except OSError as e:
        rm(sparse)
        return skip(out, 'sparse', f'this file system cannot hold a sparse {human(big)} file ({e})')
    write_extents(dense, data, [i * MiB for i in range(n)], seed=3)
    try:
        for fmt in ('raw', 'qcow2'):
            print(f'sparse: {human(big)} sparse vs {human(data)} dense, both {human(data)} of data, to {fmt}')
            dst, times = os.path.join(d, 'sparse-copy.' + fmt), {}
            for run in range(args.runs):
                for src in rotate([sparse, dense], run):
                    rm(dst)
                    wall = timed([args.bmirror, 'copy', '-f', 'raw', '-O', fmt, src, dst], [dst])[0]
                    check(['qemu-img', 'compare', '-f', 'raw', '-F', fmt, src, dst], 'the copy differs')
                    times.setdefault(src, []).append(wall)
                    print(f'    run {run + 1}: {os.path.basename(src):10} {wall:8.3f} s', flush=True)
            rm(dst)
            ratios = [s / t for s, t in zip(times[sparse], times[dense])]
            out['sparse'][fmt] = {'ratio': spread(ratios), 'sparse_s': times[sparse], 'dense_s': times[dense]}
            goal(out, f'sparse {human(big)}->{fmt}: time / {human(data)} disk', statistics.median(ratios),
                 SPARSE_GOAL, '<=', f'min-max {min(ratios):.2f}-{max(ratios):.2f}')
        print(f'sparse: move of the {human(big)} sparse disk vs the {human(data)} dense one (no guest)')
        times, rss = {}, []
        work, dst = os.path.join(d, 'sparse-move-src.raw'), os.path.join(d, 'sparse-move-dst.raw')
        for run in range(args.runs):
            for src in rotate([sparse, dense], run):
                rm(work, dst)
                check(['cp', '--sparse=always', src, work], 'copying the source')
                fsync(work)
                wall, peak, _ = move_alone(args, d, work, dst)
                check(['qemu-img', 'compare', '-f', 'raw', '-F', 'raw', src, dst], 'the moved disk differs')
                times.setdefault(src, []).append(wall)
                if src == sparse:
                    rss.append(peak)
                print(f'    run {run + 1}: {os.path.basename(src):10} {wall:8.3f} s  RSS {peak / MiB:6.1f} MiB',
                      flush=True)
        rm(work, dst)
        ratios = [s / t for s, t in zip(times[sparse], times[dense])]
        out['sparse']['move'] = {'ratio': spread(ratios), 'sparse_s': times[sparse], 'dense_s': times[dense],
                                 'peak_rss': rss}
        goal(out, f'sparse {human(big)} move: time / {human(data)} disk', statistics.median(ratios),
             SPARSE_GOAL, '<=', f'min-max {min(ratios):.2f}-{max(ratios):.2f}')
        goal(out, f'sparse {human(big)} move: serve peak RSS, MiB', max(rss) / MiB, 64 + 2 * big / TiB, '<=',
             'worst run')
    except Failed as e:
        fail(out, 'sparse', e)
    finally:
        rm(sparse, dense)

# ------------------------------------------------------------------ live move

class Guest:
    """fio writing 4 KiB blocks at random, queue depth 16, over NBD, until stopped."""
    def __init__(self, uri, d, tag):
        self.pre = os.path.join(d, 'guest-' + tag)
        self.out = self.pre + '.json'
        rm(self.out, self.pre + '_iops.1.log', self.pre + '_clat.1.log')
        self.fio = Daemon(['fio', '--name=guest', '--ioengine=nbd', '--uri=' + uri, '--rw=randwrite', '--bs=4k',
                           '--iodepth=16', '--size=100%', '--time_based', '--runtime=3600', '--randrepeat=0',
                           '--output-format=json', '--output=' + self.out, '--write_iops_log=' + self.pre,
                           '--write_lat_log=' + self.pre, f'--log_avg_msec={LOG_MS}', '--log_max_value=1',
                           '--log_unix_epoch=1'], d, 'guest-' + tag)

    def warm_up(self, seconds):
        time.sleep(seconds)
        if self.fio.p.poll() is not None:
            raise Failed(self.fio.cmd, self.fio.stderr(), 'the guest (fio) stopped')

    def stop(self):
        """End fio (SIGINT: it still writes its report); the whole run's write figures."""
        self.fio.stop(signal.SIGINT)
        try:   # fio prints "terminating on signal" before its JSON
            with open(self.out) as f:
                text = f.read()
            job = json.loads(text[text.find('{'):])['jobs'][0]
        except (OSError, ValueError, LookupError):
            raise Failed(self.fio.cmd, self.fio.stderr(), 'the guest (fio) wrote no report')
        if job['error']:
            raise Failed(self.fio.cmd, self.fio.stderr(), f'the guest (fio) failed, error {job["error"]}')
        return job['write']

    def window(self, t0, t1):
        """Mean IOPS and max completion latency (ms) of the log windows that overlap [t0, t1]."""
        def values(kind):
            with open(f'{self.pre}_{kind}.1.log') as f:
                rows = [[int(x) for x in line.split(',')[:2]] for line in f if line.strip()]
            return [v for ms, v in rows if t0 <= ms / 1000 <= t1 + LOG_MS / 1000]
        iops, lat = values('iops'), values('clat')
        return {'iops': statistics.mean(iops) if iops else None, 'max_lat_ms': max(lat) / 1e6 if lat else None}

def vm_hwm(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM:'))

def move_bmirror(args, d, work, dst, fmt):
    nbd, ctl = os.path.join(d, 'serve.nbd'), os.path.join(d, 'serve.ctl')
    srv = Daemon([args.bmirror, 'serve', '-f', fmt, '--nbd', 'unix:' + nbd, '--control', ctl, work],
                 d, 'serve', [nbd, ctl])
    guest = None
    try:
        guest = Guest(f'nbd+unix:///?socket={nbd}', d, 'bmirror')
        guest.warm_up(args.warmup)
        t0 = time.time()
        summary = check([args.bmirror, 'move', '--control', ctl, '--to', dst, '-O', fmt, '--mode', 'active',
                         '--json'], 'bmirror move failed')
        t1 = time.time()
        rss = vm_hwm(srv.p.pid)
        time.sleep(0.3)
        whole = guest.stop()
    finally:
        if guest:
            guest.fio.stop(signal.SIGINT)
        srv.stop()
    summary = json.loads(summary.strip().splitlines()[-1])
    return {'move_s': t1 - t0, 'bytes_copied': summary['bytes_copied'], 'peak_rss': rss,
            'whole_run_iops': whole['iops'], **guest.window(t0, t1), 'before_move': guest.window(t0 - args.warmup / 2, t0)}

def move_alone(args, d, work, dst, fmt='raw'):
    """`bmirror serve` of a disk and a move of it with no guest: (seconds, serve's peak RSS, bytes copied)."""
    nbd, ctl = os.path.join(d, 'alone.nbd'), os.path.join(d, 'alone.ctl')
    srv = Daemon([args.bmirror, 'serve', '-f', fmt, '--nbd', 'unix:' + nbd, '--control', ctl, work],
                 d, 'serve-alone', [nbd, ctl])
    try:
        t0 = time.perf_counter()
        out = check([args.bmirror, 'move', '--control', ctl, '--to', dst, '-O', fmt, '--json'], 'bmirror move failed')
        wall = time.perf_counter() - t0
        summary = json.loads(out.strip().splitlines()[-1])
        return wall, vm_hwm(srv.p.pid), summary['bytes_copied']
    finally:
        srv.stop()

class Qmp:
    """Just enough of QMP: commands, and waiting for an event."""
    def __init__(self, path, daemon):
        self.daemon, self.events, sock = daemon, [], socket.socket(socket.AF_UNIX)
        sock.settimeout(600)
        sock.connect(path)
        self.f = sock.makefile('rw')
        self.read()                       # the greeting
        self.cmd('qmp_capabilities')

    def read(self):
        """The next message; events are also kept in self.events."""
        try:
            m = json.loads(self.f.readline())
        except (OSError, ValueError) as e:
            raise Failed(self.daemon.cmd, self.daemon.stderr(), f'QMP of qemu-storage-daemon: {e}')
        if 'event' in m:
            self.events.append(m)
        return m

    def cmd(self, name, /, **arguments):
        self.f.write(json.dumps({'execute': name, 'arguments': arguments}) + '\n')
        self.f.flush()
        while 'event' in (m := self.read()):
            pass
        if 'error' in m:
            raise Failed(self.daemon.cmd, self.daemon.stderr(), f'QMP {name} {arguments}: {m["error"]}')
        return m.get('return')

    def wait_event(self, name):
        while not any(e['event'] == name for e in self.events):
            self.read()
        return next(e for e in self.events if e['event'] == name).get('data', {})

def move_qsd(args, d, work, dst, fmt):
    nbd, qmp = os.path.join(d, 'qsd.nbd'), os.path.join(d, 'qsd.qmp')
    check(['qemu-img', 'create', '-q', '-f', fmt, dst, str(args.size)], 'making the QSD target')
    qsd = Daemon(['qemu-storage-daemon',
                  '--blockdev', f'driver=file,node-name=src-file,filename={work},aio=io_uring,cache.direct=on',
                  '--blockdev', f'driver={fmt},node-name=src,file=src-file',
                  '--nbd-server', f'addr.type=unix,addr.path={nbd}',
                  '--export', 'type=nbd,id=export,node-name=src,name=disk,writable=on',
                  '--chardev', f'socket,id=qmp,path={qmp},server=on,wait=off', '--monitor', 'chardev=qmp'],
                 d, 'qsd', [nbd, qmp])
    guest = None
    try:
        q = Qmp(qmp, qsd)
        q.cmd('blockdev-add', driver='file', filename=dst, aio='io_uring', cache={'direct': True},
              **{'node-name': 'dst-file'})
        q.cmd('blockdev-add', driver=fmt, file='dst-file', **{'node-name': 'dst'})
        guest = Guest(f'nbd+unix:///disk?socket={nbd}', d, 'qsd')
        guest.warm_up(args.warmup)
        t0 = time.time()
        q.cmd('blockdev-mirror', device='src', target='dst', sync='full',
              **{'job-id': 'move', 'copy-mode': 'write-blocking'})
        q.wait_event('BLOCK_JOB_READY')
        q.cmd('block-job-complete', device='move')
        done = q.wait_event('BLOCK_JOB_COMPLETED')
        t1 = time.time()
        if 'error' in done:
            raise Failed(qsd.cmd, qsd.stderr(), f'blockdev-mirror failed: {done["error"]}')
        rss = vm_hwm(qsd.p.pid)
        time.sleep(0.3)
        whole = guest.stop()
        q.cmd('quit')
    finally:
        if guest:
            guest.fio.stop(signal.SIGINT)
        qsd.stop()
    return {'move_s': t1 - t0, 'peak_rss': rss, 'whole_run_iops': whole['iops'], **guest.window(t0, t1),
            'before_move': guest.window(t0 - args.warmup / 2, t0)}

def bench_move(args, d, srcs, have, out):
    fmts = [f for f in ('raw', 'qcow2', 'vhdx') if f in args.formats.split(',')]
    systems = ['bmirror'] + (['qsd'] if 'qemu-storage-daemon' in have else [])
    if fmts and len(systems) == 1:
        skip(out, 'move against qemu-storage-daemon', 'it is not installed: bmirror\'s own figures only')
    for fmt in fmts:
        print(f'move {fmt}: {human(args.size)} disk, guest fio 4k randwrite qd16 over NBD', flush=True)
        runs = {s: [] for s in systems}
        work, dst, scratch = (os.path.join(d, n + fmt) for n in ('move-src.', 'move-dst.', 'move-copy.'))
        try:
            for run in range(args.runs):
                for name in rotate(systems, run):
                    rm(work, dst)
                    check(['cp', '--sparse=always', srcs.get(fmt), work], 'copying the source')
                    fsync(work)
                    r = (move_bmirror if name == 'bmirror' else move_qsd)(args, d, work, dst, fmt)
                    if fmt != 'raw':
                        check(['qemu-img', 'check', '-q', '-f', fmt, dst], f'{name}: the moved image is damaged')
                    if name == 'bmirror':   # what a copy of the disk as it was at the pivot reads
                        rm(scratch)
                        c = json.loads(check([args.bmirror, 'copy', '--json', '-f', fmt, '-O', fmt, work, scratch],
                                             'bmirror copy of the moved disk'))
                        r['copy_bytes'] = c['bytes_copied']   # data written, as the move's
                        rm(scratch)
                    runs[name].append(r)
                    lat = r['max_lat_ms']
                    print(f'    run {run + 1}: {name:8} {r["move_s"]:7.3f} s  guest {r["iops"] or 0:9.0f} IOPS  '
                          f'max {lat if lat is not None else float("nan"):7.2f} ms  '
                          f'RSS {r["peak_rss"] / MiB:6.1f} MiB', flush=True)
            # Sparseness with no guest: under one, the disk gains data in holes the copy
            # has passed (mirrored, not copied), so the figure above runs below 1.
            rm(work, dst, scratch)
            check(['cp', '--sparse=always', srcs.get(fmt), work], 'copying the source')
            fsync(work)
            c = json.loads(check([args.bmirror, 'copy', '--json', '-f', fmt, '-O', fmt, work, scratch],
                                 'bmirror copy of the source'))
            rm(scratch)
            alone_bytes = move_alone(args, d, work, dst, fmt)[2]
            alone = alone_bytes / c['bytes_copied']
        except Failed as e:
            fail(out, 'move ' + fmt, e)
            continue
        finally:
            rm(work, dst, scratch)
        out['move'][fmt] = runs
        bm, q, med = runs['bmirror'], runs.get('qsd'), statistics.median
        if q:
            t = [b['move_s'] / x['move_s'] for b, x in zip(bm, q)]
            goal(out, f'move {fmt}: time bmirror/QSD', med(t), MOVE_GOAL, '<=', f'min-max {min(t):.2f}-{max(t):.2f}; '
                 f'{med(b["move_s"] for b in bm):.2f} s vs {med(x["move_s"] for x in q):.2f} s')
            i = [b['iops'] / x['iops'] for b, x in zip(bm, q) if b['iops'] and x['iops']]
            goal(out, f'move {fmt}: guest IOPS bmirror/QSD', med(i) if i else None, IOPS_GOAL, '>=',
                 f'{med(b["iops"] or 0 for b in bm):.0f} vs {med(x["iops"] or 0 for x in q):.0f}')
        lat = [b['max_lat_ms'] for b in bm if b['max_lat_ms'] is not None]
        qlat = [x['max_lat_ms'] for x in q or [] if x['max_lat_ms'] is not None]
        goal(out, f'move {fmt}: guest max latency, ms', max(lat) if lat else None, LAT_GOAL_MS, '<=',
             'worst run' + (f'; QSD {max(qlat):.1f} ms' if qlat else ''))
        by = [b['bytes_copied'] / b['copy_bytes'] for b in bm]
        goal(out, f'move {fmt}: no guest, bytes moved / copy wrote', alone, BYTES_TOL, '~',
             f'{alone_bytes / MiB:.0f} MiB / {c["bytes_copied"] / MiB:.0f} MiB')
        goal(out, f'move {fmt}: under the guest, bytes moved / copy wrote', med(by), BYTES_TOL, '~',
             f'min-max {min(by):.3f}-{max(by):.3f}; {bm[0]["bytes_copied"] / MiB:.0f} MiB / '
             f'{bm[0]["copy_bytes"] / MiB:.0f} MiB')
        goal(out, f'move {fmt}: serve peak RSS, MiB', max(b['peak_rss'] for b in bm) / MiB, 64 + 2 * args.size / TiB,
             '<=', 'worst run' + (f'; QSD {max(x["peak_rss"] for x in q) / MiB:.0f} MiB' if q else ''))

# ------------------------------------------------------------------ report

def table(headers, rows):
    w = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for r in [headers, ['-' * n for n in w]] + rows:
        print('  '.join(str(x).ljust(n) for x, n in zip(r, w)).rstrip())

def report(out):
    print()
    if out['copy']:
        print('Copy: ratio = peer time / bmirror time in the same run (> 1: bmirror faster); '
              'for fio, the raw O_DIRECT write of the same data')
        table(['case', 'peer', 'ratio', 'min-max', 'bmirror s', 'peer s', 'bm CPU s/GiB', 'peer CPU s/GiB'],
              [[r['case'], r['peer'], f'{r["ratio"]["median"]:.2f}', f'{r["ratio"]["min"]:.2f}-{r["ratio"]["max"]:.2f}',
                f'{r["bmirror_s"]:.3f}', f'{r["peer_s"]:.3f}', f'{r["bmirror_cpu_s_per_gib"]:.2f}',
                f'{r["peer_cpu_s_per_gib"]:.2f}'] for r in out['copy']])
        print()
    if out['goals']:
        print('Goals')
        table(['figure', 'value', 'goal', 'met', 'detail'],
              [[g['figure'], '-' if g['value'] is None else f'{g["value"]:.3f}', g['goal'],
                {True: 'yes', False: 'NO', None: '?'}[g['met']], g['detail']] for g in out['goals']])
        print()
    for s in out['skipped']:
        print(f'skipped: {s}')
    for f in out['failures']:
        print(f'FAILED: {f["case"]}')

def add_common_options(ap):
    """--dir, --keep, --json and --bmirror, shared with bench/backup.py."""
    ap.add_argument('--dir', default='/var/tmp', help='a new folder for the images is made in it (default /var/tmp)')
    ap.add_argument('--keep', action='store_true', help='keep that folder (logs, images) at the end')
    ap.add_argument('--json', help='write the raw figures to this file')
    ap.add_argument('--bmirror', default='build/tools/bmirror')

def clean_up(args, d):
    """Kill the background processes left, remove the bench folder unless --keep."""
    for p in list(LIVE):
        p.stop(signal.SIGKILL)
    if args.keep:
        print(f'kept {d}')
    else:
        shutil.rmtree(d, ignore_errors=True)

def save(args, out):
    """Write --json FILE; the exit status: 1 if a case failed."""
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 1 if out['failures'] else 0

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--only', default='copy,move,sparse,steady', help='parts to run (default: all)')
    ap.add_argument('--size', type=parse_size, default=GiB, help='disk size (default 1G); the data of sparse')
    ap.add_argument('--runs', type=int, default=5, help='runs of each case (default 5)')
    ap.add_argument('--steady', type=int, nargs='?', const=10, default=None, metavar='N',
                    help='copy raw->raw N times with bmirror alone (default 10)')
    ap.add_argument('--sparse-size', type=parse_size, default=TiB, help='size of the sparse disk (default 1T)')
    ap.add_argument('--formats', default='raw,qcow2,vhdx,nbd',
                    help='copy cases with a side of these formats, and move disks (default raw,qcow2,vhdx,nbd)')
    ap.add_argument('--warmup', type=float, default=2.0, help='seconds of guest load before a move starts')
    add_common_options(ap)
    args = ap.parse_args()
    args.bmirror = os.path.abspath(args.bmirror)
    parts = set(args.only.split(',')) | ({'steady'} if args.steady else set())
    if parts - {'copy', 'move', 'sparse', 'steady'} or args.runs < 1 or args.size < MiB:
        ap.error('--only takes copy,move,sparse,steady; --runs >= 1; --size >= 1M')
    if not os.access(args.bmirror, os.X_OK) or not shutil.which('qemu-img'):
        ap.error(f'needs {args.bmirror} and qemu-img')
    tools = ['qemu-nbd', 'nbdcopy', 'nbdkit', 'fio', 'qemu-storage-daemon']
    have = {t for t in tools if shutil.which(t)} | {'qemu-img'}
    built = time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(os.stat(args.bmirror).st_mtime))
    print(f'bench/speed.py: {args.bmirror} (built {built} UTC), size {human(args.size)}, {args.runs} runs, '
          f'{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}')
    print('peers found: ' + ', '.join(sorted(have)) +
          ('; NOT installed (their cases are skipped): ' + ', '.join(sorted(set(tools) - have))
           if set(tools) - have else ''), flush=True)
    d = tempfile.mkdtemp(prefix='bmirror-speed-', dir=args.dir)
    out = {'args': vars(args), 'bmirror_built': built, 'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
           'copy': [], 'goals': [], 'steady': None, 'sparse': {}, 'move': {}, 'skipped': [], 'failures': []}
    out['skipped'] += [f'{t}: not installed, its rows are left out' for t in sorted(set(tools) - have)]
    srcs = Sources(d, args.size)
    out['data_bytes'] = srcs.data   # the disk's data: what CPU s/GiB divides by
    try:
        if 'copy' in parts:
            bench_copy(args, d, srcs, have, out)
        if 'steady' in parts:
            bench_steady(args, d, srcs, out)
        if 'sparse' in parts:
            bench_sparse(args, d, out)
        if 'move' in parts and 'fio' not in have:
            skip(out, 'move', 'fio (the guest) is not installed')
        elif 'move' in parts:
            bench_move(args, d, srcs, have, out)
    finally:
        clean_up(args, d)
    report(out)
    return save(args, out)

if __name__ == '__main__':
    sys.exit(main())
