#!/usr/bin/env python3
"""cbwfs benchmark: cbwfs beside the native file, qemu-storage-daemon (qsd) and
libfuse's own passthrough_hp (the FUSE limit), side by side in one run.

Phases (--phases, comma separated; default all but rbd, which needs --ceph):
  backup       idle full backup, seconds (native: cp + fsync)
  fio          4k random writes/reads and 1 MiB sequential reads (psync, 1 job), and
               4k random writes/reads with 4 jobs x libaio iodepth 16
  during       4k random writes alone, then during a full backup limited to 64 MiB/s,
               with caches warm (drive read whole first) and dropped; IOPS, p99 write
               latency, the share kept of the idle rate in the same cache state, RSS
  direct       4k O_DIRECT random reads and writes, libaio iodepth 16, on a fresh mount
               and after a buffered sequential read of the whole drive
  writeback    4k random writes, 4k random writes with fsync every 16, and a sqlite
               commit rate (synchronous=FULL, one small insert per transaction) on ext4
               over a loop device on the drive; cbwfs with and without -o writeback_cache
  bitmap       4k random write IOPS on a cbwfs drive: no bitmap, a bitmap, a persistent
               bitmap (--state-dir)
  incremental  full backup with a bitmap (one transaction), 5% of the drive dirtied in
               random 64 KiB clusters, then a timed incremental to the raw full copy in
               place and to a qcow2 overlay on it; cbwfs beside qsd (its own bitmap)
  nbd          full backup to nbdkit memory and to qemu-nbd serving qcow2 (unix
               sockets); cbwfs beside qsd and nbdcopy (the protocol limit)
  rbd          (--ceph) full backup to rbd:POOL/IMAGE:conf=... beside `rbd bench`
Systems: native, qsd, cbwfs, cbwfs-wb (-o writeback_cache, if cbwfs offers it),
pt-nocache / pt-cache (passthrough_hp --nocache / with its caches; needs --libfuse-git
or --libfuse-src). Each phase runs every system in turn, --reps times, and reports
medians; caches are dropped before each measurement unless the phase says otherwise.
Ratios are "cbwfs ahead" ratios: > 1 means cbwfs is better (for times and latencies
the other system's figure is divided by cbwfs's).

Usage (as root): tests/bench/run.sh [--size-mib N] [--runtime S] [--reps N]
       [--phases fio,direct,...] [--libfuse-git DIR] [--ceph] [--out FILE]
Never part of CI's pass/fail: absolute figures depend on the machine.
"""
import argparse
import shlex
import atexit
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

MiB = 1 << 20
ALL_PHASES = ["backup", "fio", "during", "direct", "writeback", "bitmap", "incremental",
              "nbd", "rbd"]
LIBFUSE_TAG = "fuse-3.14.0"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def is_mount(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Reaper:
    """Everything started or mounted is registered here and undone in reverse order at
    the end, whatever happened (exception, Ctrl-C, SIGTERM). Context managers undo their
    own on the normal path and unregister; this catches the rest."""

    def __init__(self):
        self.items = []  # (key, fn)
        self.lock = threading.Lock()

    def add(self, key, fn):
        with self.lock:
            self.items.append((key, fn))
        return key

    def done(self, key):
        with self.lock:
            self.items = [(k, f) for k, f in self.items if k is not key]

    def proc(self, p):
        return self.add(p, lambda: kill_group(p, 10))

    def fuse_mount(self, path):
        key = object()
        self.add(key, lambda: subprocess.run(["fusermount3", "-uz", path],
                                             stderr=subprocess.DEVNULL))
        return key

    def cleanup(self):
        while True:
            with self.lock:
                if not self.items:
                    return
                key, fn = self.items.pop()
            try:
                fn()
            except Exception as e:  # keep going: the rest must still be undone
                log(f"cleanup: {e}")


REAPER = Reaper()


def popen(cmd, **kw):
    kw.setdefault("stdout", subprocess.DEVNULL)
    # Own session: a terminal's Ctrl-C reaches the bench alone, which then stops the
    # daemons in order (unmounting first) rather than all of them at once.
    kw.setdefault("start_new_session", True)
    p = subprocess.Popen(cmd, **kw)
    REAPER.proc(p)
    return p


def kill_group(p, timeout):
    """SIGTERM to the process and its group (every popen() has its own: fio's job
    processes and a shell's children go too), SIGKILL after the timeout."""
    def signal_group(sig):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
    if p.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            p.wait()
    signal_group(signal.SIGKILL)  # leftovers of the group once its leader is gone


def stop_proc(p, timeout=20):
    kill_group(p, timeout)
    REAPER.done(p)


def run_group(cmd):
    """subprocess.run for a tool that forks workers (fio): on any exception, Ctrl-C
    included, the whole process group dies, so nothing keeps a mount busy."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate()
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def fuse_unmount(mnt, proc, timeout=30):
    """fusermount3 -u, retried while something still holds the mount; then lazily."""
    deadline = time.monotonic() + timeout
    while is_mount(mnt):
        if subprocess.run(["fusermount3", "-u", mnt], stderr=subprocess.DEVNULL).returncode == 0:
            break
        if time.monotonic() > deadline or (proc and proc.poll() is not None):
            subprocess.run(["fusermount3", "-uz", mnt], stderr=subprocess.DEVNULL)
            break
        time.sleep(0.1)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples a process's RSS every 50 ms; .peak is the highest seen (KiB)."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


class FioError(RuntimeError):
    pass


def fio(path, name, rw, bs, runtime, jobs=1, engine="psync", iodepth=1, size=None,
        direct=False, fsync=0, invalidate=False):
    """One fio job; returns iops, MiB/s and p99 completion latency (us) of the writes
    (or of the reads for a read job)."""
    cmd = ["fio", "--name=" + name, "--filename=" + path, "--rw=" + rw, "--bs=" + bs,
           "--ioengine=" + engine, "--iodepth=%d" % iodepth, "--numjobs=%d" % jobs,
           "--time_based", "--runtime=%d" % runtime, "--group_reporting",
           "--output-format=json", "--randrepeat=0", "--norandommap",
           "--invalidate=%d" % int(invalidate), "--direct=%d" % int(direct)]
    if size:
        cmd.append("--size=%d" % size)
    if fsync:
        cmd.append("--fsync=%d" % fsync)
    res = run_group(cmd)
    if res.returncode != 0:
        text = res.stderr + res.stdout
        m = re.search(r"io_u error on file [^:]*: ([^:]+): (read|write) offset", text)
        raise FioError(f"fio {rw} fails: {m.group(1)}" if m else
                       f"fio {rw} fails: {text.strip()[-200:]}")
    out = res.stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["write"] if "write" in rw else j["read"]
    p99 = side.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000.0
    return {"iops": side["iops"], "bw_mib": side["bw_bytes"] / MiB, "p99_us": p99}


def read_whole(path):
    """A buffered sequential read of the whole file (fills the page cache)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass


class Qmp:
    """A minimal QMP client over a unix socket (loopback only)."""

    def __init__(self, path, proc=None):
        deadline = time.time() + 20
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline or (proc and proc.poll() is not None):
                    raise RuntimeError(f"no QMP on {path}")
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def cmd(self, execute, **args):
        self.s.settimeout(600)
        msg = {"execute": execute}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QmpError(execute, msg["error"])
            return msg["return"]

    def wait_event(self, name, timeout=900):
        deadline = time.time() + timeout
        while True:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            if time.time() > deadline:
                raise TimeoutError(name)
            self.s.settimeout(max(0.1, deadline - time.time()))
            self.events.append(self._read())

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class ControlQmp:
    """The Qmp interface over MOUNTPOINT/control, for a cbwfs without --qmp (an older
    build measured for "before" figures). Completion is read from jobs/<id>."""

    def __init__(self, mnt):
        self.mnt, self.events = mnt, []

    def cmd(self, execute, **args):
        msg = {"execute": execute}
        if args:
            msg["arguments"] = args
        fd = os.open(os.path.join(self.mnt, "control"), os.O_RDWR)
        try:
            try:
                os.write(fd, json.dumps(msg).encode())
            except OSError:
                pass  # the reply, read below, says why
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                reply += chunk
        finally:
            os.close(fd)
        msg = json.loads(reply.decode().splitlines()[0])
        if "error" in msg:
            raise QmpError(execute, msg["error"])
        return msg["return"]

    def wait_event(self, name, timeout=900):
        assert name == "BLOCK_JOB_COMPLETED"
        path = os.path.join(self.mnt, "jobs", "job0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(path) as f:
                rec = json.load(f)
            if "result" in rec:
                data = {"len": rec.get("len", 0), "offset": rec.get("offset", 0)}
                if rec["result"] != "success":
                    data["error"] = rec.get("error", rec["result"])
                return {"event": name, "data": data}
            time.sleep(0.005)
        raise TimeoutError(name)

    def close(self):
        pass


class QmpError(RuntimeError):
    def __init__(self, execute, err):
        super().__init__(f"{execute}: {err.get('desc', err)}")
        self.desc = err.get("desc", "")


class JobFailed(RuntimeError):
    pass


class QmpBackupMixin:
    """drive-backup/transaction/bitmaps through QMP, identical for qsd and cbwfs."""
    node = "drive0"

    def start_backup(self, target, speed=0, sync="full", fmt="raw", mode=None, bitmap=None):
        self.qmp.events.clear()
        args = {"device": self.node, "target": target, "sync": sync, "job-id": "job0"}
        if fmt:
            args["format"] = fmt
        if speed:
            args["speed"] = speed
        if mode:
            args["mode"] = mode
        if bitmap:
            args["bitmap"] = bitmap
        self.qmp.cmd("drive-backup", **args)

    def wait_backup(self):
        e = self.qmp.wait_event("BLOCK_JOB_COMPLETED")
        self.last_completed = e["data"]  # len: what the job copied (incremental: the dirty)
        if e["data"].get("error"):
            raise JobFailed(f"{self.name} backup: {e['data']['error']}")

    def backup(self, target, **kw):
        t0 = time.monotonic()
        self.start_backup(target, **kw)
        self.wait_backup()
        return time.monotonic() - t0

    def full_with_bitmaps(self, target, bitmaps):
        """One point in time: new bitmaps + a full backup (a transaction), waited for."""
        self.qmp.events.clear()
        actions = [{"type": "block-dirty-bitmap-add", "data": {"node": self.node, "name": b}}
                   for b in bitmaps]
        actions.append({"type": "drive-backup", "data": {
            "device": self.node, "target": target, "sync": "full", "format": "raw",
            "job-id": "job0"}})
        t0 = time.monotonic()
        self.qmp.cmd("transaction", actions=actions)
        self.wait_backup()
        return time.monotonic() - t0

    def bitmap_add(self, name, **kw):
        self.qmp.cmd("block-dirty-bitmap-add", node=self.node, name=name, **kw)


class Native:
    """The image file itself; a plain copy stands in for a backup."""
    name = "native"
    pid = None

    def __init__(self, ctx, image):
        self.image = image

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    @property
    def drive(self):
        return self.image

    def backup(self, target, **kw):
        t0 = time.monotonic()
        sh(["cp", "--sparse=never", self.image, target])
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        return time.monotonic() - t0

    def start_backup(self, target, speed, **kw):
        # No CBW here: a rate-limited copy stands in for "a backup running" (its cost to
        # the writer is the shared disk only).
        self._bg = popen(["sh", "-c", f"pv -q -L {speed} '{self.image}' > '{target}'"])

    def wait_backup(self):
        self._bg.wait()
        REAPER.done(self._bg)


class Qsd(QmpBackupMixin):
    name = "qsd"

    def __init__(self, ctx, image):
        self.image = image
        self.mnt = os.path.join(ctx.work, "qsd-export")
        self.sock = os.path.join(ctx.work, "qsd.sock")

    def __enter__(self):
        open(self.mnt, "w").close()
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.mkey = REAPER.fuse_mount(self.mnt)
        self.proc = popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={self.image},cache.direct=off",
            "--blockdev", "driver=raw,node-name=drive0,file=file0",
            "--export", f"type=fuse,id=exp0,node-name=drive0,mountpoint={self.mnt},writable=on",
            "--chardev", f"socket,id=qmp0,path={self.sock},server=on,wait=off",
            "--monitor", "chardev=qmp0"], stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.qmp = Qmp(self.sock, self.proc)
        wait_until(lambda: is_mount(self.mnt), 20, "qsd's FUSE export")
        return self

    def __exit__(self, *a):
        try:
            self.qmp.cmd("quit")
        except Exception:
            pass
        self.qmp.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        stop_proc(self.proc)
        if is_mount(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], stderr=subprocess.DEVNULL)
        REAPER.done(self.mkey)

    @property
    def drive(self):
        return self.mnt


class Cbwfs(QmpBackupMixin):
    def __init__(self, ctx, image, name="cbwfs", extra=(), state_dir=False):
        self.ctx, self.image, self.name, self.extra = ctx, image, name, list(extra)
        self.mnt = os.path.join(ctx.work, "cbwfs-mnt")
        self.sock = os.path.join(ctx.work, "cbwfs-qmp.sock")
        self.state_dir = os.path.join(ctx.work, "cbwfs-state") if state_dir else None

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        cmd = [self.ctx.args.binary, "-f", "--log-level", "warn",
               "--drive", f"drive0={self.image}"] + self.extra + \
            shlex.split(self.ctx.args.cbwfs_args)
        if self.ctx.cbwfs_qmp:
            cmd += ["--qmp", self.sock]
        if self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            os.makedirs(self.state_dir)
            cmd += ["--state-dir", self.state_dir]
        self.mkey = REAPER.fuse_mount(self.mnt)
        self.proc = popen(cmd + [self.mnt])
        self.pid = self.proc.pid
        wait_until(lambda: self.proc.poll() is not None or
                   os.path.exists(os.path.join(self.mnt, "control")), 20, "cbwfs's mount")
        if self.proc.poll() is not None:
            raise RuntimeError(f"cbwfs exited at start: {self.proc.returncode}")
        self.qmp = Qmp(self.sock, self.proc) if self.ctx.cbwfs_qmp else ControlQmp(self.mnt)
        return self

    def __exit__(self, *a):
        self.qmp.close()
        fuse_unmount(self.mnt, self.proc)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        stop_proc(self.proc)
        REAPER.done(self.mkey)

    @property
    def drive(self):
        return os.path.join(self.mnt, "drive0")


class PassthroughHp:
    """libfuse's example/passthrough_hp over the directory holding the image."""
    pid = None

    def __init__(self, ctx, image, nocache):
        self.ctx, self.image, self.nocache = ctx, image, nocache
        self.name = "pt-nocache" if nocache else "pt-cache"
        self.mnt = os.path.join(ctx.work, "pt-mnt")

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        self.mkey = REAPER.fuse_mount(self.mnt)
        cmd = [self.ctx.passthrough_hp, "--foreground"]
        if self.nocache:
            cmd.append("--nocache")
        self.proc = popen(cmd + [os.path.dirname(self.image), self.mnt],
                          stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        wait_until(lambda: self.proc.poll() is not None or is_mount(self.mnt), 20,
                   "passthrough_hp's mount")
        if self.proc.poll() is not None:
            raise RuntimeError(f"passthrough_hp exited at start: {self.proc.returncode}")
        return self

    def __exit__(self, *a):
        fuse_unmount(self.mnt, self.proc)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        stop_proc(self.proc)
        REAPER.done(self.mkey)

    @property
    def drive(self):
        return os.path.join(self.mnt, os.path.basename(self.image))


class Ctx:
    def __init__(self, args, work):
        self.args, self.work = args, work
        self.size = args.size_mib * MiB
        self.notes = []
        self.passthrough_hp = None
        self.wb_supported = False
        self.cbwfs_qmp = True
        self.src = os.path.join(work, "src")  # only images: passthrough_hp's source tree
        os.makedirs(self.src)
        self.image = os.path.join(self.src, "image.img")

    def note(self, msg):
        log("note: " + msg)
        self.notes.append(msg)

    def note_once(self, msg):
        if msg not in self.notes:
            self.note(msg)

    def make(self, name, image=None):
        image = image or self.image
        if name == "native":
            return Native(self, image)
        if name == "qsd":
            return Qsd(self, image)
        if name == "cbwfs":
            return Cbwfs(self, image)
        if name == "cbwfs-wb":
            return Cbwfs(self, image, name, extra=["-o", "writeback_cache"])
        if name in ("pt-nocache", "pt-cache"):
            return PassthroughHp(self, image, name == "pt-nocache")
        if name == "cbwfs-nobitmap":
            return Cbwfs(self, image, name, state_dir=True)
        if name in ("cbwfs-bitmap", "cbwfs-pbitmap"):
            return Cbwfs(self, image, name, state_dir=True)
        raise KeyError(name)

    def available(self, names):
        out = []
        for n in names:
            if n.startswith("pt-") and not self.passthrough_hp:
                continue
            if n == "cbwfs-wb" and not self.wb_supported:
                continue
            if n not in self.args.systems and n.split("-")[0] not in self.args.systems:
                continue
            out.append(n)
        return out

    def target(self, name):
        return os.path.join(self.work, f"target-{name}.img")


def rm_f(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_phase(ctx, phase, systems, body):
    """Every system in turn, --reps times; body(system_name, rep) -> {measure: value}."""
    runs = {s: {} for s in systems}
    for rep in range(ctx.args.reps):
        for s in systems:
            log(f"[{phase}] rep {rep + 1}/{ctx.args.reps}: {s}")
            t0 = time.monotonic()
            vals = body(s, rep)
            log(f"[{phase}]   {s}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                for k, v in vals.items()) + f"  ({time.monotonic() - t0:.0f} s)")
            for k, v in vals.items():
                runs[s].setdefault(k, []).append(v)
    return {"systems": systems, "runs": runs,
            "medians": {s: {k: median(v) for k, v in m.items()} for s, m in runs.items()}}


# ---------------------------------------------------------------- phases


def phase_backup(ctx):
    def body(name, rep):
        tgt = ctx.target(name)
        with ctx.make(name) as s:
            rm_f(tgt)
            drop_caches()
            t = s.backup(tgt)
        rm_f(tgt)
        return {"full_backup_s": t, "full_backup_mibs": ctx.args.size_mib / t}
    return run_phase(ctx, "backup", ctx.available(["native", "qsd", "cbwfs"]), body)


FIO_JOBS = [
    ("randwrite_4k", dict(rw="randwrite", bs="4k")),
    ("randread_4k", dict(rw="randread", bs="4k")),
    ("seqread_1m", dict(rw="read", bs="1m")),
    ("randwrite_4k_j4qd16", dict(rw="randwrite", bs="4k", jobs=4, engine="libaio", iodepth=16)),
    ("randread_4k_j4qd16", dict(rw="randread", bs="4k", jobs=4, engine="libaio", iodepth=16)),
]


def phase_fio(ctx):
    def body(name, rep):
        out = {}
        with ctx.make(name) as s:
            for key, kw in FIO_JOBS:
                drop_caches()
                r = fio(s.drive, key, runtime=ctx.args.runtime, size=ctx.size, **kw)
                out[key + ("_mibs" if key.startswith("seq") else "_iops")] = (
                    r["bw_mib"] if key.startswith("seq") else r["iops"])
        return out
    return run_phase(ctx, "fio", ctx.available(
        ["native", "qsd", "cbwfs", "cbwfs-wb", "pt-nocache", "pt-cache"]), body)


def phase_during(ctx):
    speed = 64 * MiB
    # The writer runs while the backup does (size / 64 MiB/s), less a margin.
    rt = max(1, min(ctx.args.runtime, ctx.args.size_mib // 64 - 2))

    def body(name, rep):
        out = {}
        tgt = ctx.target(name)
        with ctx.make(name) as s:
            def set_caches(caches):
                drop_caches()
                if caches == "warm":
                    read_whole(s.drive)  # the drive (and below it the image) cached

            # The idle rate in each cache state: writes into a source whose page
            # cache a read filled run at their own (lower) rate even with no backup,
            # so "kept" compares like with like.
            idles = {}
            for caches in ("cold", "warm"):
                set_caches(caches)
                idles[caches] = fio(s.drive, "idle", "randwrite", "4k", runtime=rt,
                                    size=ctx.size)
            out["idle_randwrite_4k_iops"] = idles["cold"]["iops"]
            out["idle_randwrite_4k_p99_us"] = idles["cold"]["p99_us"]
            out["idle_warm_randwrite_4k_iops"] = idles["warm"]["iops"]
            out["idle_warm_randwrite_4k_p99_us"] = idles["warm"]["p99_us"]
            for caches in ("warm", "cold"):
                rm_f(tgt)
                set_caches(caches)
                idle = idles[caches]
                sampler = RssSampler(s.pid) if s.pid else None
                if sampler:
                    sampler.__enter__()
                try:
                    s.start_backup(tgt, speed=speed)
                    r = fio(s.drive, "cbw", "randwrite", "4k", runtime=rt, size=ctx.size)
                    s.wait_backup()
                finally:
                    if sampler:
                        sampler.__exit__()
                out[f"during_{caches}_randwrite_4k_iops"] = r["iops"]
                out[f"during_{caches}_randwrite_4k_p99_us"] = r["p99_us"]
                out[f"during_{caches}_kept_of_idle"] = r["iops"] / idle["iops"]
                if sampler:
                    out[f"during_{caches}_rss_mib"] = sampler.peak / 1024
        rm_f(tgt)
        return out
    return run_phase(ctx, "during", ctx.available(["native", "qsd", "cbwfs", "cbwfs-wb"]),
                     body)


def phase_direct(ctx):
    def direct(s, out, when):
        for rw in ("randread", "randwrite"):
            key = f"direct_{rw}_4k_qd16_{when}_iops"
            try:
                r = fio(s.drive, "direct", rw, "4k", runtime=ctx.args.runtime, size=ctx.size,
                        engine="libaio", iodepth=16, direct=True)
                out[key] = r["iops"]
            except FioError as e:  # e.g. passthrough_hp's O_DIRECT writes: EINVAL
                out[key] = None
                ctx.note_once(f"direct: {s.name}: O_DIRECT {e}")

    def body(name, rep):
        out = {}
        drop_caches()
        with ctx.make(name) as s:  # a fresh mount
            direct(s, out, "fresh")
            read_whole(s.drive)  # buffered: fills the drive's page cache
            direct(s, out, "after_read")
        return out
    return run_phase(ctx, "direct", ctx.available(
        ["native", "qsd", "cbwfs", "cbwfs-wb", "pt-nocache", "pt-cache"]), body)


def sqlite_commit_rate(path, seconds):
    """Small transactions (one insert each), synchronous=FULL, rollback journal."""
    for suffix in ("", "-journal"):
        rm_f(path + suffix)
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        payload = os.urandom(200)
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            con.execute("BEGIN")
            con.execute("INSERT INTO t(v) VALUES (?)", (payload,))
            con.execute("COMMIT")
            n += 1
        return n / (time.monotonic() - t0)
    finally:
        con.close()


class LoopExt4:
    """ext4 (made beforehand on the image) mounted over a loop device on a drive file."""

    def __init__(self, ctx, drive):
        self.drive, self.mnt = drive, os.path.join(ctx.work, "ext4-mnt")

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        self.dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=off", self.drive],
                                  check=True, capture_output=True, text=True).stdout.strip()
        self.lkey = REAPER.add(object(), lambda d=self.dev: subprocess.run(
            ["losetup", "-d", d], stderr=subprocess.DEVNULL))
        sh(["mount", "-t", "ext4", self.dev, self.mnt])
        self.mkey = REAPER.add(object(), lambda m=self.mnt: subprocess.run(
            ["umount", "-l", m], stderr=subprocess.DEVNULL))
        return self

    def __exit__(self, *a):
        sh(["umount", self.mnt])
        REAPER.done(self.mkey)
        sh(["losetup", "-d", self.dev])
        REAPER.done(self.lkey)


def phase_writeback(ctx):
    fs_image = os.path.join(ctx.src, "fs.img")
    fs_mib = min(ctx.args.size_mib, 512)
    sh(["truncate", "-s", f"{fs_mib}M", fs_image])
    sh(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", fs_image])

    def body(name, rep):
        out = {}
        with ctx.make(name) as s:
            drop_caches()
            r = fio(s.drive, "wr", "randwrite", "4k", runtime=ctx.args.runtime, size=ctx.size)
            out["randwrite_4k_iops"] = r["iops"]
            drop_caches()
            r = fio(s.drive, "wr", "randwrite", "4k", runtime=ctx.args.runtime, size=ctx.size,
                    fsync=16)
            out["randwrite_4k_fsync16_iops"] = r["iops"]
        with ctx.make(name, fs_image) as s:
            drop_caches()
            with LoopExt4(ctx, s.drive) as fs:
                out["sqlite_commits_ps"] = sqlite_commit_rate(
                    os.path.join(fs.mnt, "bench.db"), ctx.args.runtime)
        return out
    try:
        return run_phase(ctx, "writeback", ctx.available(
            ["native", "qsd", "cbwfs", "cbwfs-wb", "pt-nocache", "pt-cache"]), body)
    finally:
        rm_f(fs_image)


def phase_bitmap(ctx):
    def body(name, rep):
        out = {}
        with ctx.make(name) as s:
            if name == "cbwfs-bitmap":
                s.bitmap_add("b0")
            elif name == "cbwfs-pbitmap":
                s.bitmap_add("b0", persistent=True)
            drop_caches()
            out["randwrite_4k_iops"] = fio(s.drive, "bm", "randwrite", "4k",
                                           runtime=ctx.args.runtime, size=ctx.size)["iops"]
            drop_caches()
            out["randwrite_4k_j4qd16_iops"] = fio(
                s.drive, "bm", "randwrite", "4k", runtime=ctx.args.runtime, size=ctx.size,
                jobs=4, engine="libaio", iodepth=16)["iops"]
        return out
    if "cbwfs" not in ctx.args.systems:
        return None
    return run_phase(ctx, "bitmap", ["cbwfs-nobitmap", "cbwfs-bitmap", "cbwfs-pbitmap"], body)


def dirty_clusters(path, size, share, cluster=64 * 1024, seed=None):
    """Writes random data to `share` of the drive's clusters, chosen at random."""
    rnd = random.Random(seed)
    n = size // cluster
    picks = sorted(rnd.sample(range(n), max(1, int(n * share))))
    fd = os.open(path, os.O_WRONLY)
    try:
        for c in picks:
            os.pwrite(fd, rnd.randbytes(cluster), c * cluster)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(picks) * cluster


def phase_incremental(ctx):
    full = os.path.join(ctx.work, "inc-full.img")
    overlay = os.path.join(ctx.work, "inc.qcow2")

    def body(name, rep):
        out = {}
        with ctx.make(name) as s:
            for p in (full, overlay):
                rm_f(p)
            drop_caches()
            out["full_with_bitmap_s"] = s.full_with_bitmaps(full, ["braw", "bqcow2"])
            dirtied = dirty_clusters(s.drive, ctx.size, 0.05, seed=rep)
            out["dirty_mib"] = dirtied / MiB
            drop_caches()
            out["incremental_raw_inplace_s"] = s.backup(
                full, sync="incremental", bitmap="braw", mode="existing", fmt="raw")
            out["incremental_raw_len_mib"] = s.last_completed.get("len", 0) / MiB
            sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "raw", overlay])
            drop_caches()
            out["incremental_qcow2_overlay_s"] = s.backup(
                overlay, sync="incremental", bitmap="bqcow2", mode="existing", fmt="qcow2")
            out["incremental_qcow2_len_mib"] = s.last_completed.get("len", 0) / MiB
        for p in (full, overlay):
            rm_f(p)
        return out
    return run_phase(ctx, "incremental", ctx.available(["qsd", "cbwfs"]), body)


class NbdServer:
    """A fresh server per measurement: nbdkit memory, or qemu-nbd serving a new qcow2."""

    def __init__(self, ctx, kind):
        self.ctx, self.kind = ctx, kind
        self.sock = os.path.join(ctx.work, "nbd.sock")
        self.qcow2 = os.path.join(ctx.work, "nbd-target.qcow2")
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def __enter__(self):
        rm_f(self.sock)
        if self.kind == "nbdkit-memory":
            cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", self.sock, "memory",
                   f"size={self.ctx.size}"]
        else:
            rm_f(self.qcow2)
            sh(["qemu-img", "create", "-q", "-f", "qcow2", self.qcow2, str(self.ctx.size)])
            cmd = ["qemu-nbd", "-t", "-k", self.sock, "-f", "qcow2", self.qcow2]
        self.proc = popen(cmd, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.proc.poll() is not None or os.path.exists(self.sock), 20,
                   f"{self.kind}'s socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited at start")
        return self

    def __exit__(self, *a):
        stop_proc(self.proc)
        rm_f(self.sock)
        rm_f(self.qcow2)


NBD_SERVERS = ["nbdkit-memory", "qemu-nbd-qcow2"]


def phase_nbd(ctx):
    def body(name, rep):
        out = {}
        for kind in NBD_SERVERS:
            key = kind.replace("-", "_")
            with NbdServer(ctx, kind) as srv:
                if name == "nbdcopy":
                    drop_caches()
                    t0 = time.monotonic()
                    sh(["nbdcopy", "--flush", ctx.image, srv.uri])
                    t = time.monotonic() - t0
                else:
                    with ctx.make(name) as s:
                        drop_caches()
                        t = s.backup(srv.uri, mode="existing", fmt="raw")
            out[f"{key}_s"] = t
            out[f"{key}_mibs"] = ctx.args.size_mib / t
        return out
    systems = ctx.available(["qsd", "cbwfs"])
    return run_phase(ctx, "nbd", ["nbdcopy"] + systems, body)


def phase_rbd(ctx):
    script = ctx.args.ceph_script
    cdir = os.path.join(ctx.work, "ceph")
    if script and os.access(script, os.X_OK):
        start, stop = [script, "start", cdir, "memstore"], [script, "stop", cdir]
    elif os.access("tests/lib/ceph.sh", os.X_OK):
        start, stop = ["tests/lib/ceph.sh", "start", cdir], ["tests/lib/ceph.sh", "stop", cdir]
    else:
        ctx.note("rbd: no ceph-single.sh nor tests/lib/ceph.sh; phase skipped")
        return None
    # ceph-single.sh's monitor listens on 127.0.0.1:3300: with another cluster there
    # (a test suite's), our commands would talk to it. Leave it alone.
    probe = socket.socket()
    probe.settimeout(1)
    busy = probe.connect_ex(("127.0.0.1", 3300)) == 0
    probe.close()
    if busy:
        ctx.note("rbd: 127.0.0.1:3300 is taken (another Ceph cluster runs); phase skipped")
        return None
    key = REAPER.add(object(), lambda: subprocess.run(stop, stdout=subprocess.DEVNULL))
    try:
        res = subprocess.run(start, capture_output=True, text=True)
        m = re.search(r"CEPH_CONF=(\S+)", res.stdout)
        if res.returncode != 0 or not m:
            ctx.note(f"rbd: cluster did not start: {res.stderr.strip()[-300:]}")
            return None
        conf, pool = m.group(1), ctx.args.rbd_pool
        env = dict(os.environ, CEPH_CONF=conf)

        def rbd(*a, **kw):
            return subprocess.run(["rbd", "-c", conf] + list(a), env=env, **kw)
        refused = []

        def body(name, rep):
            if name == "rbd-bench":
                img = f"{pool}/bench"
                rbd("rm", img, capture_output=True)
                rbd("create", "--size", f"{ctx.args.size_mib}M", img, check=True)
                t0 = time.monotonic()  # wall clock, as for cbwfs's job (rbd bench's own
                r = rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-pattern", "seq",
                        "--io-total", f"{ctx.args.size_mib}M", img, check=True,
                        capture_output=True, text=True)  # "elapsed" is whole seconds)
                t = time.monotonic() - t0
                rbd("rm", img, capture_output=True)
                out = {"rbd_s": t, "rbd_mibs": ctx.args.size_mib / t}
                m = re.search(r"bytes/sec:\s*([\d.]+)\s*([KMG]?)i?B", r.stdout)
                if m:
                    scale = {"": 1.0 / MiB, "K": 1.0 / 1024, "M": 1.0, "G": 1024.0}[m.group(2)]
                    out["rbd_bench_reported_mibs"] = float(m.group(1)) * scale
                return out
            if refused:
                return {}
            img = f"{pool}/cbwfs-bench"
            rbd("rm", img, capture_output=True)
            with ctx.make(name) as s:
                drop_caches()
                try:
                    t = s.backup(f"rbd:{img}:conf={conf}", fmt="raw")
                except QmpError as e:
                    refused.append(str(e))
                    ctx.note(f"rbd: cbwfs refused the rbd: target ({e.desc}); row skipped")
                    return {}
            rbd("rm", img, capture_output=True)
            return {"rbd_s": t, "rbd_mibs": ctx.args.size_mib / t}
        return run_phase(ctx, "rbd", ["rbd-bench"] + ctx.available(["cbwfs"]), body)
    finally:
        subprocess.run(stop, stdout=subprocess.DEVNULL)
        REAPER.done(key)


PHASE_FUNCS = {"backup": phase_backup, "fio": phase_fio, "during": phase_during,
               "direct": phase_direct, "writeback": phase_writeback, "bitmap": phase_bitmap,
               "incremental": phase_incremental, "nbd": phase_nbd, "rbd": phase_rbd}

# Ratio columns per phase: (label, numerator system, denominator system).
RATIOS = {
    "bitmap": [("pbitmap/none", "cbwfs-pbitmap", "cbwfs-nobitmap"),
               ("bitmap/none", "cbwfs-bitmap", "cbwfs-nobitmap")],
    "nbd": [("cbwfs/qsd", "cbwfs", "qsd"), ("cbwfs/nbdcopy", "cbwfs", "nbdcopy")],
    "rbd": [("cbwfs/rbdbench", "cbwfs", "rbd-bench")],
}
DEFAULT_RATIOS = [("cbwfs/qsd", "cbwfs", "qsd"), ("cbwfs/native", "cbwfs", "native"),
                  ("cbwfs/pt-nc", "cbwfs", "pt-nocache"), ("wb/qsd", "cbwfs-wb", "qsd"),
                  ("wb/pt-cache", "cbwfs-wb", "pt-cache"), ("wb/cbwfs", "cbwfs-wb", "cbwfs")]


def lower_is_better(measure):
    return measure.endswith(("_s", "_us", "_rss_mib"))


# ---------------------------------------------------------------- setup


def build_passthrough_hp(ctx):
    a = ctx.args
    if not a.libfuse_git and not a.libfuse_src:
        ctx.note("no --libfuse-git/--libfuse-src: passthrough_hp (FUSE limit) columns skipped")
        return None
    out_dir = a.libfuse_build or os.path.join(a.workdir, f"cbwfs-bench-libfuse-{LIBFUSE_TAG}")
    binary = os.path.join(out_dir, "passthrough_hp")
    if os.access(binary, os.X_OK):
        return binary
    os.makedirs(out_dir, exist_ok=True)
    try:
        if a.libfuse_git:
            src = os.path.join(out_dir, "src")
            shutil.rmtree(src, ignore_errors=True)
            os.makedirs(src)
            git = subprocess.Popen(["git", f"--git-dir={a.libfuse_git}", "archive", LIBFUSE_TAG,
                                    "example"], stdout=subprocess.PIPE)
            sh(["tar", "-x", "-C", src], stdin=git.stdout)
            git.stdout.close()
            if git.wait() != 0:
                raise RuntimeError(f"git archive {LIBFUSE_TAG} failed in {a.libfuse_git}")
        else:
            src = a.libfuse_src
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                               capture_output=True, text=True).stdout.split()
        log(f"building passthrough_hp ({LIBFUSE_TAG}) into {out_dir}")
        sh(["g++", "-std=c++17", "-O2", "-o", binary + ".tmp",
            os.path.join(src, "example", "passthrough_hp.cc"), "-I",
            os.path.join(src, "example")] + flags + ["-lpthread"])
        os.rename(binary + ".tmp", binary)
        return binary
    except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
        ctx.note(f"passthrough_hp did not build ({e}): its columns skipped")
        return None


def cbwfs_help(binary):
    r = subprocess.run([binary, "--help"], capture_output=True, text=True)
    return r.stdout + r.stderr


def report(ctx, phases):
    a = ctx.args
    print(f"\ncbwfs bench: image {a.size_mib} MiB, fio {a.runtime} s, medians of {a.reps}; "
          "ratios > 1 mean the first system is ahead")
    for phase, res in phases.items():
        if not res:
            continue
        systems, med = res["systems"], res["medians"]
        measures = []
        for s in systems:
            for k in med[s]:
                if k not in measures:
                    measures.append(k)
        cols = [(lbl, n, d) for lbl, n, d in RATIOS.get(phase, DEFAULT_RATIOS)
                if n in systems and d in systems]
        res["ratios"] = {}
        w = max([len(m) for m in measures] + [20])
        print(f"\n== {phase}")
        hdr = f"{'measure':{w}} " + " ".join(f"{s:>14}" for s in systems) + \
            "".join(f" {lbl:>13}" for lbl, _, _ in cols)
        print(hdr)
        print("-" * len(hdr))
        for k in measures:
            vals = [med[s].get(k) for s in systems]
            line = f"{k:{w}} " + " ".join(
                f"{v:14.2f}" if isinstance(v, (int, float)) else f"{'-':>14}" for v in vals)
            for lbl, n, d in cols:
                x, y = med[n].get(k), med[d].get(k)
                r = None
                if x and y:
                    r = y / x if lower_is_better(k) else x / y
                res["ratios"].setdefault(k, {})[lbl] = r
                line += f" {r:13.2f}" if r else f" {'-':>13}"
            print(line)
    if ctx.notes:
        print("\nnotes:")
        for n in ctx.notes:
            print("  - " + n)
    with open(a.out, "w") as f:
        json.dump({"config": vars(a), "notes": ctx.notes, "phases": phases}, f, indent=2)
    print(f"\nJSON: {a.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="the cbwfs binary")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--phases", default=",".join(p for p in ALL_PHASES if p != "rbd"),
                    help="comma separated, of: " + ",".join(ALL_PHASES))
    ap.add_argument("--systems", default="native,qsd,cbwfs,pt",
                    help="which of native,qsd,cbwfs,pt to run (cbwfs includes cbwfs-wb)")
    ap.add_argument("--libfuse-git", help="a libfuse git dir holding tag " + LIBFUSE_TAG)
    ap.add_argument("--libfuse-src", help="an unpacked libfuse " + LIBFUSE_TAG + " tree")
    ap.add_argument("--libfuse-build", help="where passthrough_hp is built (and kept)")
    ap.add_argument("--ceph", action="store_true", help="also run the rbd phase")
    ap.add_argument("--ceph-script", default="/work/shared/tools/ceph-single.sh")
    ap.add_argument("--rbd-pool", default="rbd")
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("--cbwfs-args", default="",
                    help="extra cbwfs options for every cbwfs system, e.g. '--cbw-buffer 0'")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--stop-on-error", action="store_true",
                    help="stop at a failing phase (default: note it, run the next one)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (drops caches, mounts FUSE, loop devices)")
    args.binary = os.path.abspath(args.binary)
    args.systems = args.systems.split(",")
    phases = [p for p in args.phases.split(",") if p]
    if args.ceph and "rbd" not in phases:
        phases.append("rbd")
    for p in phases:
        if p not in PHASE_FUNCS:
            sys.exit(f"unknown phase {p!r}; phases: {','.join(ALL_PHASES)}")

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    work = tempfile.mkdtemp(prefix="cbwfs-bench.", dir=args.workdir)

    def cleanup():
        REAPER.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    atexit.register(cleanup)
    ctx = Ctx(args, work)
    results = {}
    try:
        if any(p in phases for p in ("fio", "direct", "writeback")) and "pt" in args.systems:
            ctx.passthrough_hp = build_passthrough_hp(ctx)
        help_text = cbwfs_help(args.binary)
        ctx.wb_supported = "writeback_cache" in help_text
        ctx.cbwfs_qmp = "--qmp" in help_text
        if not ctx.cbwfs_qmp:
            ctx.note("cbwfs has no --qmp: commands go through its control file")
        if not ctx.wb_supported:
            ctx.note("cbwfs --help does not mention writeback_cache: cbwfs-wb rows skipped")
        log(f"writing a {args.size_mib} MiB random image")
        sh(["dd", "if=/dev/urandom", f"of={ctx.image}", "bs=1M", f"count={args.size_mib}",
            "status=none", "conv=fsync"])
        for p in phases:
            log(f"=== phase {p}")
            try:
                results[p] = PHASE_FUNCS[p](ctx)
            except Exception as e:  # noqa: BLE001 -- one phase's failure spares the rest
                if args.stop_on_error:
                    raise
                log(traceback.format_exc())
                ctx.note(f"phase {p} failed: {type(e).__name__}: {e}")
                REAPER.cleanup()  # whatever the phase left running
        report(ctx, results)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
