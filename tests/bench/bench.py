#!/usr/bin/env python3
"""cbwfs benchmark: native file vs qemu-storage-daemon vs cbwfs, side by side.

One run, the same 1 GiB random image for all three:
  * full backup of an idle drive (native: cp + fsync), seconds
  * fio 4k random writes, 4k random reads, 1 MiB sequential reads through the
    mount (psync, 1 job; and 4 jobs / libaio iodepth 16)
  * fio 4k random writes while a full backup limited to 64 MiB/s runs, and the
    writer's p99 latency
  * daemon RSS (peak) during the backup
Caches are dropped between phases; each figure is the median of --reps runs.
Prints a table with the ratios cbwfs/qsd and cbwfs/native and writes JSON.

Usage (as root): tests/bench/run.sh [--size-mib N] [--runtime S] [--reps N] [--out FILE]
Never part of CI's pass/fail: absolute figures depend on the machine.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def rss_peak_kib(pid):
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
            self.peak = max(self.peak, rss_peak_kib(self.pid))
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def fio(path, name, rw, bs, runtime, jobs=1, engine="psync", iodepth=1, size=None, extra=()):
    cmd = ["fio", "--name=" + name, "--filename=" + path, "--rw=" + rw, "--bs=" + bs,
           "--ioengine=" + engine, "--iodepth=%d" % iodepth, "--numjobs=%d" % jobs,
           "--time_based", "--runtime=%d" % runtime, "--group_reporting",
           "--output-format=json", "--randrepeat=0", "--norandommap", "--invalidate=1"]
    if size:
        cmd.append("--size=%d" % size)
    cmd += list(extra)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["write"] if "write" in rw else j["read"]
    p99 = side.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000.0
    return {"iops": side["iops"], "bw_mib": side["bw_bytes"] / MiB, "p99_us": p99}


class Qmp:
    """A minimal QMP client over a unix socket (loopback only)."""

    def __init__(self, path):
        deadline = time.time() + 20
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, execute, **args):
        self.f.write(json.dumps({"execute": execute, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"{execute}: {msg['error']}")
            return msg["return"]

    def wait_event(self, name, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            self.s.settimeout(max(0.1, deadline - time.time()))
            msg = json.loads(self.f.readline())
            if "event" in msg:
                self.events.append(msg)
        raise TimeoutError(name)


class Native:
    name = "native"

    def __init__(self, work, image):
        self.work, self.image, self.pid = work, image, None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    @property
    def drive(self):
        return self.image

    def backup(self, target, speed=0):
        t0 = time.monotonic()
        sh(["cp", "--sparse=never", self.image, target])
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        return time.monotonic() - t0

    def start_backup(self, target, speed):
        # The native file has no CBW; a plain rate-limited copy stands in for
        # "a backup running" (its cost to the writer is the shared disk only).
        self._bg = subprocess.Popen(["sh", "-c", f"pv -q -L {speed} {self.image} > {target}"])

    def wait_backup(self):
        self._bg.wait()


class Qsd:
    name = "qsd"

    def __init__(self, work, image):
        self.work, self.image = work, image
        self.mnt = os.path.join(work, "qsd-export")
        self.sock = os.path.join(work, "qsd.sock")

    def __enter__(self):
        open(self.mnt, "w").close()
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={self.image},cache.direct=off",
            "--blockdev", "driver=raw,node-name=drive0,file=file0",
            "--export", f"type=fuse,id=exp0,node-name=drive0,mountpoint={self.mnt},writable=on",
            "--chardev", f"socket,id=qmp0,path={self.sock},server=on,wait=off",
            "--monitor", "chardev=qmp0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.qmp = Qmp(self.sock)
        return self

    def __exit__(self, *a):
        try:
            self.qmp.cmd("quit")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        subprocess.run(["fusermount3", "-uz", self.mnt], stderr=subprocess.DEVNULL)

    @property
    def drive(self):
        return self.mnt

    def start_backup(self, target, speed=0):
        self.qmp.events.clear()
        self.qmp.cmd("drive-backup", device="drive0", target=target, sync="full", format="raw",
                     speed=speed, **{"job-id": "job0"})

    def wait_backup(self):
        self.qmp.wait_event("BLOCK_JOB_COMPLETED")

    def backup(self, target, speed=0):
        t0 = time.monotonic()
        self.start_backup(target, speed)
        self.wait_backup()
        return time.monotonic() - t0


class Cbwfs:
    name = "cbwfs"

    def __init__(self, work, image, binary):
        self.work, self.image, self.binary = work, image, binary
        self.mnt = os.path.join(work, "cbwfs-mnt")

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = subprocess.Popen([self.binary, "-f", "--log-level", "warn", "--drive",
                                      f"drive0={self.image}", self.mnt])
        self.pid = self.proc.pid
        deadline = time.time() + 20
        while not os.path.exists(os.path.join(self.mnt, "control")):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("cbwfs did not mount")
            time.sleep(0.02)
        return self

    def __exit__(self, *a):
        subprocess.run(["fusermount3", "-u", self.mnt])
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            subprocess.run(["fusermount3", "-uz", self.mnt])

    @property
    def drive(self):
        return os.path.join(self.mnt, "drive0")

    def control(self, execute, **args):
        with open(os.path.join(self.mnt, "control"), "w") as f:
            f.write(json.dumps({"execute": execute, "arguments": args}))

    def start_backup(self, target, speed=0):
        try:
            os.unlink(os.path.join(self.mnt, "jobs", "job0"))
        except OSError:
            pass
        self.control("drive-backup", device="drive0", target=target, sync="full", speed=speed,
                     **{"job-id": "job0"})

    def wait_backup(self):
        path = os.path.join(self.mnt, "jobs", "job0")
        while True:
            with open(path) as f:
                rec = json.load(f)
            if "result" in rec:
                if rec["result"] != "success":
                    raise RuntimeError(f"cbwfs backup: {rec}")
                return
            time.sleep(0.005)

    def backup(self, target, speed=0):
        t0 = time.monotonic()
        self.start_backup(target, speed)
        self.wait_backup()
        return time.monotonic() - t0


def median(xs):
    return statistics.median(xs) if xs else 0.0


def measure(system, args, work):
    res = {}
    target = os.path.join(work, f"target-{system.name}.img")
    size = args.size_mib * MiB

    def rm_target():
        if os.path.exists(target):
            os.unlink(target)

    # 1. Idle full backup.
    times = []
    for _ in range(args.reps):
        rm_target()
        drop_caches()
        times.append(system.backup(target))
    res["backup_s"] = median(times)
    rm_target()

    # 2. fio through the mount.
    phases = [
        ("randwrite_4k", dict(rw="randwrite", bs="4k")),
        ("randread_4k", dict(rw="randread", bs="4k")),
        ("seqread_1m", dict(rw="read", bs="1m")),
        ("randwrite_4k_j4qd16", dict(rw="randwrite", bs="4k", jobs=4, engine="libaio", iodepth=16)),
        ("randread_4k_j4qd16", dict(rw="randread", bs="4k", jobs=4, engine="libaio", iodepth=16)),
    ]
    for key, kw in phases:
        runs = []
        for _ in range(args.reps):
            drop_caches()
            runs.append(fio(system.drive, key, runtime=args.runtime, size=size, **kw))
        res[key + "_iops"] = median([r["iops"] for r in runs])
        res[key + "_mibs"] = median([r["bw_mib"] for r in runs])

    # 3. Writes during a rate-limited backup, and RSS meanwhile.
    runs, peaks = [], []
    for _ in range(args.reps):
        rm_target()
        drop_caches()
        pid = getattr(system, "pid", None)
        sampler = RssSampler(pid) if pid else None
        if sampler:
            sampler.__enter__()
        system.start_backup(target, 64 * MiB)
        runs.append(fio(system.drive, "cbw", "randwrite", "4k",
                        runtime=min(args.runtime, max(1, args.size_mib // 64 - 2)), size=size))
        system.wait_backup()
        if sampler:
            sampler.__exit__()
            peaks.append(sampler.peak)
    rm_target()
    res["randwrite_4k_during_backup_iops"] = median([r["iops"] for r in runs])
    res["randwrite_4k_during_backup_p99_us"] = median([r["p99_us"] for r in runs])
    res["rss_during_backup_mib"] = median(peaks) / 1024 if peaks else None
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio phase")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--only", default="native,qsd,cbwfs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (drops caches, mounts FUSE)")

    work = tempfile.mkdtemp(prefix="cbwfs-bench.", dir=args.workdir)
    try:
        image = os.path.join(work, "image.img")
        sh(["dd", "if=/dev/urandom", f"of={image}", "bs=1M", f"count={args.size_mib}",
            "status=none", "conv=fsync"])
        results = {}
        makers = {"native": lambda: Native(work, image), "qsd": lambda: Qsd(work, image),
                  "cbwfs": lambda: Cbwfs(work, image, args.binary)}
        for name in args.only.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            with makers[name]() as system:
                results[name] = measure(system, args, work)
        report(results, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results, args):
    keys = list(next(iter(results.values())).keys())
    lower_is_better = {"backup_s", "randwrite_4k_during_backup_p99_us", "rss_during_backup_mib"}
    ratios = {}
    print(f"\nimage {args.size_mib} MiB, fio {args.runtime}s x {args.reps} (medians); "
          "ratios > 1 mean cbwfs is ahead")
    hdr = f"{'measure':36} {'native':>11} {'qsd':>11} {'cbwfs':>11} {'cbwfs/qsd':>10} {'cbwfs/nat':>10}"
    print(hdr)
    print("-" * len(hdr))
    for k in keys:
        vals = {n: results.get(n, {}).get(k) for n in ("native", "qsd", "cbwfs")}

        def ratio(other):
            a, b = vals["cbwfs"], vals[other]
            if not a or not b:
                return None
            return b / a if k in lower_is_better else a / b

        r = {"qsd": ratio("qsd"), "native": ratio("native")}
        ratios[k] = r
        fmt = lambda v: f"{v:11.2f}" if isinstance(v, (int, float)) else f"{'-':>11}"
        rf = lambda v: f"{v:10.2f}" if v else f"{'-':>10}"
        print(f"{k:36} {fmt(vals['native'])} {fmt(vals['qsd'])} {fmt(vals['cbwfs'])} "
              f"{rf(r['qsd'])} {rf(r['native'])}")
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "results": results, "ratios": ratios}, f, indent=2)
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
