"""The QMP socket (--qmp) with stock clients the project did not write.

QEMU's own Python QMP library (qemu.qmp's QMPClient) and qmp-shell, vendored
at ../shared/vendor/qemu-qmp beside the source tree, are used only as
clients, against the real cbwfs on a real mount. Run by ctest
(qmp_stock_clients); exits 77 (skipped) when the vendored copy is absent.

Environment: CBWFS_BINARY (the daemon), QEMU_QMP_DIR (the vendored package).
"""

import asyncio
import os
import random
import socket
import stat
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from cbwfs_daemon import Daemon, cbwfs_binary, file_digest, wait_for  # noqa: E402

QEMU_QMP_DIR = os.environ.get("QEMU_QMP_DIR", "")
if not os.path.isdir(os.path.join(QEMU_QMP_DIR, "qemu", "qmp")):
    print(f"SKIP: QEMU's qemu.qmp is not at '{QEMU_QMP_DIR}' "
          "(expected ../shared/vendor/qemu-qmp beside the source tree)")
    sys.exit(77)
sys.path.insert(0, QEMU_QMP_DIR)
from qemu.qmp import EventListener, ExecuteError, QMPClient  # noqa: E402

MiB = 1 << 20
DRIVE_SIZE = 32 * MiB
EVENT_DEADLINE = 60.0


def fill(path, size, seed):
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for off in range(0, size, MiB):
            f.seek(off)
            f.write(rng.randbytes(MiB // 2))  # half data, half hole per MiB


class QmpDaemon(Daemon):
    def __init__(self, **kw):
        super().__init__({"drive0": DRIVE_SIZE}, **kw)
        self.sock = os.path.join(self.dir, "qmp.sock")
        self.extra_args += ["--qmp", self.sock]


async def connect(sock, name="test"):
    c = QMPClient(name)
    await asyncio.wait_for(c.connect(sock), EVENT_DEADLINE)
    return c


async def next_event(listener, names=None):
    while True:
        ev = await asyncio.wait_for(listener.get(), EVENT_DEADLINE)
        if names is None or ev["event"] in names:
            return ev


async def events_until_completed(listener, device):
    seen = []
    while True:
        ev = await asyncio.wait_for(listener.get(), EVENT_DEADLINE)
        seen.append(ev)
        if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and \
                ev["data"].get("device") == device:
            return seen


def error_of(exc):
    return exc.error.error.class_, exc.error.error.desc


class StockClients(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.d = QmpDaemon()
        self.d.start()
        fill(self.d.drives["drive0"], DRIVE_SIZE, 1)

    def tearDown(self):
        self.d.cleanup()

    async def test_greeting_and_negotiation(self):
        st = os.lstat(self.d.sock)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        c = await connect(self.d.sock)
        try:
            g = c.greeting.QMP
            self.assertEqual(g.capabilities, [])
            self.assertTrue(str(g.version["package"]).startswith("cbwfs "))
            self.assertEqual(g.version, await c.execute("query-version"))
            with self.assertRaises(ExecuteError) as e:
                await c.execute("qmp_capabilities")
            self.assertEqual(error_of(e.exception),
                             ("CommandNotFound",
                              "Capabilities negotiation is already complete, command ignored"))
        finally:
            await c.disconnect()

        # Before negotiation: QEMU's refusal, and no events.
        raw = QMPClient("raw")
        raw.negotiate = False
        await raw.connect(self.d.sock)
        try:
            with self.assertRaises(ExecuteError) as e:
                await raw.execute("query-block")
            self.assertEqual(error_of(e.exception),
                             ("CommandNotFound",
                              "Expecting capabilities negotiation with 'qmp_capabilities'"))
            await raw.execute("qmp_capabilities")
            blocks = await raw.execute("query-block")
            self.assertEqual(blocks[0]["device"], "drive0")
        finally:
            await raw.disconnect()

    async def test_backup_followed_to_completion_through_events(self):
        src = self.d.drives["drive0"]
        point_in_time = file_digest(src)
        target = self.d.path("backup.img")
        c = await connect(self.d.sock)
        try:
            with c.listener() as listener:
                # Slow enough that the writes below land while it runs.
                await c.execute("drive-backup", {"device": "drive0", "target": target,
                                                 "sync": "full", "speed": 8 * MiB})
                ev = await next_event(listener, ("JOB_STATUS_CHANGE",))
                self.assertEqual(ev["data"], {"id": "drive0", "status": "created"})
                self.assertIsInstance(ev["timestamp"]["seconds"], int)
                self.assertIsInstance(ev["timestamp"]["microseconds"], int)
                # Overwrite the drive through the mount while the job runs.
                fd = os.open(os.path.join(self.d.mnt, "drive0"), os.O_WRONLY)
                try:
                    for off in range(DRIVE_SIZE - 4 * MiB, DRIVE_SIZE, 256 * 1024):
                        os.pwrite(fd, b"\xee" * 4096, off)
                finally:
                    os.close(fd)
                jobs = await c.execute("query-block-jobs")
                self.assertEqual(jobs[0]["device"], "drive0")
                await c.execute("block-job-set-speed", {"device": "drive0", "speed": 0})
                seen = await events_until_completed(listener, "drive0")
        finally:
            await c.disconnect()
        done = seen[-1]
        self.assertEqual(done["event"], "BLOCK_JOB_COMPLETED", seen)
        self.assertEqual(done["data"]["len"], DRIVE_SIZE)
        self.assertEqual(done["data"]["offset"], DRIVE_SIZE)
        self.assertNotIn("error", done["data"])
        statuses = [e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"]
        self.assertEqual(statuses[-2:], ["waiting", "pending"], seen)
        self.assertEqual(file_digest(target), point_in_time)
        self.assertNotEqual(file_digest(src), point_in_time)

    async def test_errors_carry_qemus_class_and_text(self):
        c = await connect(self.d.sock)
        try:
            cases = [
                ("drive-backup", {"device": "nope", "target": self.d.path("t"), "sync": "full"},
                 "GenericError", "Cannot find device='nope' nor node-name='nope'"),
                ("block-job-cancel", {"device": "nope"}, "DeviceNotActive",
                 "Block job 'nope' not found"),
                ("job-cancel", {"id": "nope"}, "GenericError", "Job not found"),
                ("drive-backup", {"device": "drive0", "sync": "full"}, "GenericError",
                 "Parameter 'target' is missing"),
                ("frobnicate", None, "CommandNotFound", "The command frobnicate has not been found"),
            ]
            for cmd, args, cls, desc in cases:
                with self.subTest(cmd=cmd, args=args):
                    with self.assertRaises(ExecuteError) as e:
                        await c.execute(cmd, args)
                    self.assertEqual(error_of(e.exception), (cls, desc))
            # Still usable after errors.
            self.assertEqual(await c.execute("query-jobs"), [])
        finally:
            await c.disconnect()
        self.assertIn("qmp: frobnicate: CommandNotFound", self.d.log())

    async def test_several_clients_receive_the_same_events(self):
        clients = [await connect(self.d.sock, f"c{i}") for i in range(4)]
        listeners = [EventListener() for _ in clients]
        try:
            for c, listener in zip(clients, listeners):
                c.register_listener(listener)
            await clients[0].execute("drive-backup", {"device": "drive0", "job-id": "shared",
                                                      "target": self.d.path("s.img"),
                                                      "sync": "full"})
            streams = [await events_until_completed(l, "shared") for l in listeners]
        finally:
            for c, listener in zip(clients, listeners):
                c.remove_listener(listener)
                await c.disconnect()

        def key(stream):
            return [(e["event"], dict(e["data"]), dict(e["timestamp"])) for e in stream]

        first = key(streams[0])
        self.assertEqual(first[0][:2], ("JOB_STATUS_CHANGE", {"id": "shared",
                                                             "status": "created"}))
        self.assertEqual(first[-1][0], "BLOCK_JOB_COMPLETED")
        for s in streams[1:]:
            self.assertEqual(key(s), first)

    async def test_a_client_that_disconnects_mid_command_or_mid_events(self):
        async def until(cond, what):
            end = asyncio.get_running_loop().time() + EVENT_DEADLINE
            while not cond():
                self.assertLess(asyncio.get_running_loop().time(), end, what)
                await asyncio.sleep(0.005)

        for i in range(5):
            c = await connect(self.d.sock, f"gone{i}")
            listener = EventListener()
            c.register_listener(listener)
            task = asyncio.ensure_future(c.execute(
                "drive-backup", {"device": "drive0", "job-id": f"j{i}",
                                 "target": self.d.path(f"j{i}.img"), "sync": "full",
                                 "speed": 4 * MiB}))
            # The daemon has taken the command (its job exists); the client
            # goes without waiting for the reply, while the job's events flow.
            await until(lambda: os.path.exists(os.path.join(self.d.mnt, "jobs", f"j{i}")),
                        f"job j{i}")
            await c.disconnect()
            try:
                await task
            except Exception:  # the reply may or may not have made it
                pass
            c2 = await connect(self.d.sock, "check")
            try:
                await c2.execute("job-cancel", {"id": f"j{i}"})  # it is there
            finally:
                await c2.disconnect()
        # Half a command, then gone; and a client gone between greeting and
        # negotiation.
        for payload in (b'{"execute": "qmp_capabilities"}{"execute": "query-bl', b""):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.d.sock)
            s.sendall(payload)
            s.close()
        self.assertTrue(self.d.alive())
        c = await connect(self.d.sock)
        try:
            self.assertEqual((await c.execute("query-block"))[0]["device"], "drive0")
        finally:
            await c.disconnect()
        self.assertTrue(self.d.alive())

    def test_qmp_shell_through_a_pipe(self):
        script = "\n".join([
            "query-block",
            f"drive-backup device=drive0 job-id=sh target={self.d.path('sh.img')} sync=full",
            "block-job-cancel device=nope",
            "query-version",
        ]) + "\n"
        env = dict(os.environ, PYTHONPATH=QEMU_QMP_DIR)
        r = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", self.d.sock],
                           input=script, capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout
        self.assertIn("Connected to QEMU 0.", out)
        self.assertIn('"device": "drive0"', out)
        self.assertIn('{"return": {}}', out)
        self.assertIn('{"error": {"class": "DeviceNotActive", "desc": "Block job \'nope\' not '
                      'found"}}', out)
        self.assertIn('"package": "cbwfs ', out)
        wait_for(lambda: os.path.exists(os.path.join(self.d.mnt, "jobs", "sh")), what="job sh")


class SocketLifecycle(unittest.TestCase):
    def test_in_use_refused_stale_replaced_removed_at_stop(self):
        with QmpDaemon() as a:
            # A second daemon (its own drive and mount) on the same socket.
            other = QmpDaemon()
            try:
                args = [cbwfs_binary(), "-f", "--drive", f"d={other.drives['drive0']}",
                        "--qmp", a.sock, other.mnt]
                r = subprocess.run(args, capture_output=True, text=True, timeout=60)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn(a.sock, r.stderr)
                self.assertIn("in use", r.stderr)
                self.assertFalse(os.path.ismount(other.mnt))
            finally:
                other.cleanup()
            # Still serving the first daemon's clients.
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(a.sock)
            self.assertIn(b'"QMP"', s.makefile("rb").readline())
            s.close()
            # Killed: the socket file stays behind, stale.
            a.proc.kill()
            a.proc.wait()
            subprocess.run(["fusermount3", "-uz", a.mnt])
            self.assertTrue(stat.S_ISSOCK(os.lstat(a.sock).st_mode))
            a.start()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(a.sock)
            self.assertIn(b'"QMP"', s.makefile("rb").readline())
            s.close()
            self.assertEqual(a.stop(), 0, a.log())
            self.assertFalse(os.path.exists(a.sock))

    def test_detached_daemon_has_its_socket_when_it_returns(self):
        d = QmpDaemon()
        try:
            args = [cbwfs_binary(), "--drive", f"drive0={d.drives['drive0']}", "--qmp", d.sock,
                    "--log-file", d.log_path, d.mnt]
            r = subprocess.run(args, capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            # No retry: the socket exists and answers as soon as cbwfs returned.
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.sock)
            f = s.makefile("rwb")
            self.assertIn(b'"QMP"', f.readline())
            s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-block","id":1}')
            self.assertEqual(f.readline(), b'{"return": {}}\n')
            self.assertIn(b'"device": "drive0"', f.readline())
            s.close()
            subprocess.run(["fusermount3", "-u", d.mnt], check=True)
            wait_for(lambda: not os.path.exists(d.sock), what="the socket to be removed")
        finally:
            d.cleanup()


if __name__ == "__main__":
    unittest.main(verbosity=2)
