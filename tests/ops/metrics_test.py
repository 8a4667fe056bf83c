"""MOUNTPOINT/metrics through the real daemon, read by a real Prometheus
parser (Debian's python3-prometheus-client): the text is accepted, the
counters move with writes and with a backup's copy-before-write copies, and
jobs show as gauges. Run by ctest (ops_metrics).

Environment: CBWFS_BINARY.
"""

import errno
import json
import os
import stat
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from cbwfs_daemon import Daemon, wait_for  # noqa: E402

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("SKIP: python3-prometheus-client is not installed (tests/lib/install-deps.sh)")
    sys.exit(77)

MiB = 1 << 20
DRIVE_SIZE = 16 * MiB


def read_metrics(mnt):
    with open(os.path.join(mnt, "metrics")) as f:
        text = f.read()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return text, families


def value(families, family, sample_name, **labels):
    for s in families[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{sample_name}{labels} not found")


def control(mnt, command):
    fd = os.open(os.path.join(mnt, "control"), os.O_RDWR)
    try:
        os.write(fd, json.dumps(command).encode())
    finally:
        os.close(fd)


def job_record(mnt, job):
    try:
        with open(os.path.join(mnt, "jobs", job)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


class Metrics(unittest.TestCase):
    def setUp(self):
        self.d = Daemon({"drive0": DRIVE_SIZE, "drive1": MiB})
        self.d.start()
        with open(self.d.drives["drive0"], "r+b") as f:
            f.write(os.urandom(DRIVE_SIZE))

    def tearDown(self):
        self.d.cleanup()

    def test_the_file_is_read_only_prometheus_text(self):
        path = os.path.join(self.d.mnt, "metrics")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o444)
        self.assertIn("metrics", os.listdir(self.d.mnt))
        with self.assertRaises(OSError) as e:
            os.open(path, os.O_WRONLY)
        self.assertIn(e.exception.errno, (errno.EACCES, errno.EPERM))
        text, fam = read_metrics(self.d.mnt)
        self.assertEqual(fam["cbwfs_drive_writes"].type, "counter")
        self.assertEqual(fam["cbwfs_drive_written_bytes"].type, "counter")
        self.assertEqual(fam["cbwfs_drive_cbw_copies"].type, "counter")
        self.assertEqual(fam["cbwfs_drive_cbw_bytes"].type, "counter")
        self.assertEqual(fam["cbwfs_drive_write_latency_seconds"].type, "histogram")
        self.assertEqual(fam["cbwfs_job_state"].type, "gauge")
        for drive in ("drive0", "drive1"):
            self.assertEqual(value(fam, "cbwfs_drive_writes", "cbwfs_drive_writes_total",
                                   drive=drive), 0)
        self.assertEqual(value(fam, "cbwfs_drive_size_bytes", "cbwfs_drive_size_bytes",
                               drive="drive0"), DRIVE_SIZE)
        # Each read from the start is a fresh snapshot.
        self.assertEqual(read_metrics(self.d.mnt)[0].count("\n"), text.count("\n"))

    def test_counters_move_with_writes(self):
        _, before = read_metrics(self.d.mnt)
        fd = os.open(os.path.join(self.d.mnt, "drive0"), os.O_WRONLY)
        try:
            for i in range(10):
                self.assertEqual(os.pwrite(fd, b"w" * 4096, i * 65536), 4096)
        finally:
            os.close(fd)
        _, after = read_metrics(self.d.mnt)

        def delta(family, sample, **labels):
            return value(after, family, sample, **labels) - value(before, family, sample, **labels)

        self.assertEqual(delta("cbwfs_drive_writes", "cbwfs_drive_writes_total",
                               drive="drive0"), 10)
        self.assertEqual(delta("cbwfs_drive_written_bytes", "cbwfs_drive_written_bytes_total",
                               drive="drive0"), 40960)
        self.assertEqual(delta("cbwfs_drive_writes", "cbwfs_drive_writes_total",
                               drive="drive1"), 0)
        h = "cbwfs_drive_write_latency_seconds"
        self.assertEqual(delta(h, h + "_count", drive="drive0"), 10)
        self.assertEqual(delta(h, h + "_bucket", drive="drive0", le="+Inf"), 10)
        self.assertGreater(delta(h, h + "_sum", drive="drive0"), 0)

    def test_a_backup_moves_cbw_counters_and_shows_as_job_gauges(self):
        # Slow, so the writes below reach clusters it has not copied yet.
        control(self.d.mnt, {"execute": "drive-backup", "arguments": {
            "device": "drive0", "job-id": "b0", "target": self.d.path("b0.img"),
            "sync": "full", "speed": 2 * MiB}})
        _, fam = read_metrics(self.d.mnt)
        self.assertEqual(value(fam, "cbwfs_job_length_bytes", "cbwfs_job_length_bytes",
                               job="b0", drive="drive0"), DRIVE_SIZE)
        self.assertEqual(value(fam, "cbwfs_job_state", "cbwfs_job_state", job="b0",
                               state="running"), 1)
        self.assertEqual(value(fam, "cbwfs_job_state", "cbwfs_job_state", job="b0",
                               state="concluded"), 0)
        fd = os.open(os.path.join(self.d.mnt, "drive0"), os.O_WRONLY)
        try:
            for off in range(DRIVE_SIZE - 4 * MiB, DRIVE_SIZE, MiB):
                os.pwrite(fd, b"c" * 4096, off)
        finally:
            os.close(fd)
        _, fam = read_metrics(self.d.mnt)
        copies = value(fam, "cbwfs_drive_cbw_copies", "cbwfs_drive_cbw_copies_total",
                       drive="drive0")
        self.assertGreaterEqual(copies, 4)
        self.assertGreaterEqual(value(fam, "cbwfs_drive_cbw_bytes", "cbwfs_drive_cbw_bytes_total",
                                      drive="drive0"), 4 * 65536)
        self.assertEqual(value(fam, "cbwfs_drive_cbw_copies", "cbwfs_drive_cbw_copies_total",
                               drive="drive1"), 0)
        # The copies were waited for: those writes were slower than the rest.
        h = "cbwfs_drive_write_latency_seconds"
        self.assertEqual(value(fam, h, h + "_count", drive="drive0"), 4)

        control(self.d.mnt, {"execute": "block-job-set-speed",
                             "arguments": {"device": "b0", "speed": 0}})
        wait_for(lambda: (job_record(self.d.mnt, "b0") or {}).get("result"), what="job b0 to end")
        _, fam = read_metrics(self.d.mnt)
        self.assertEqual(value(fam, "cbwfs_job_offset_bytes", "cbwfs_job_offset_bytes",
                               job="b0"), DRIVE_SIZE)
        # Ended: the record's status (auto-dismissed: "null"), and only that.
        final = job_record(self.d.mnt, "b0")["status"]
        self.assertIn(final, ("concluded", "null"))
        states = {s.labels["state"]: s.value for s in fam["cbwfs_job_state"].samples
                  if s.labels["job"] == "b0"}
        self.assertEqual([k for k, v in states.items() if v == 1], [final])
        self.assertEqual(value(fam, "cbwfs_job_state", "cbwfs_job_state", job="b0",
                               state="running"), 0)
        self.assertEqual(value(fam, "cbwfs_job_result", "cbwfs_job_result", job="b0",
                               result="success"), 1)
        self.assertGreater(value(fam, "cbwfs_job_finished_timestamp_seconds",
                                 "cbwfs_job_finished_timestamp_seconds", job="b0"),
                           value(fam, "cbwfs_job_started_timestamp_seconds",
                                 "cbwfs_job_started_timestamp_seconds", job="b0") - 1)
        # Removing the record removes the job's series.
        os.unlink(os.path.join(self.d.mnt, "jobs", "b0"))
        text, _ = read_metrics(self.d.mnt)
        self.assertNotIn('job="b0"', text)


if __name__ == "__main__":
    unittest.main(verbosity=2)
