"""Runs the real cbwfs binary on a temp mount for Python end-to-end tests.

The Python counterpart of tests/fs/mount_fixture.h: every wait polls with a
deadline, and teardown always unmounts (lazily) and kills the daemon, whatever
state the test left it in. The binary comes from $CBWFS_BINARY.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time


def wait_for(cond, deadline=20.0, what="condition"):
    """Polls cond() every few ms until true; raises after the deadline."""
    end = time.monotonic() + deadline
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        time.sleep(0.005)


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cbwfs_binary():
    path = os.environ.get("CBWFS_BINARY")
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError("set CBWFS_BINARY to the cbwfs binary under test")
    return path


class Daemon:
    """One cbwfs -f on DIR/mnt with drives in DIR; a context manager."""

    def __init__(self, drives, extra_args=(), env=None):
        self.dir = tempfile.mkdtemp(prefix="cbwfs-py.", dir=os.environ.get("TMPDIR"))
        self.mnt = os.path.join(self.dir, "mnt")
        os.mkdir(self.mnt)
        self.drives = {}
        for name, size in drives.items():
            path = os.path.join(self.dir, name + ".img")
            with open(path, "wb") as f:
                f.truncate(size)
            self.drives[name] = path
        self.extra_args = list(extra_args)
        self.env = env
        self.proc = None
        self.log_path = os.path.join(self.dir, "cbwfs.log")

    def path(self, name):
        return os.path.join(self.dir, name)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def start(self):
        args = [cbwfs_binary(), "-f"]
        for name, path in self.drives.items():
            args += ["--drive", f"{name}={path}"]
        args += self.extra_args + [self.mnt]
        env = dict(os.environ)
        env.update(self.env or {})
        if getattr(self, "_log", None):
            self._log.close()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=env)

        def live():
            if self.proc.poll() is not None:
                raise AssertionError(f"cbwfs exited with {self.proc.returncode}: {self.log()}")
            return os.path.ismount(self.mnt) and os.path.exists(os.path.join(self.mnt, "control"))

        wait_for(live, what="the mount")

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, deadline=30.0):
        """Signals the daemon and returns its exit status."""
        self.proc.send_signal(sig)
        return self.proc.wait(deadline)

    def cleanup(self):
        subprocess.run(["fusermount3", "-uz", self.mnt], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)
