"""The background disk writer alone (kvtier/writer.py), writing real files: jobs in the order
given, flush waits for them, a full queue holds the producer back, a failed write is logged
and the writer goes on, close drains the queue."""

from __future__ import annotations

import logging
import threading

import pytest

from kvtier.writer import DiskWriter, Entry, WriteJob


def job(*names: str, size: int = 10) -> WriteJob:
    return WriteJob([Entry(name.encode(), name.encode() * size) for name in names])


class Files:
    """A write function that writes each entry to a file and logs the order it did so;
    `gate` (when cleared) holds every write until the test opens it."""

    def __init__(self, directory):
        self.directory = directory
        self.order: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail: set[str] = set()

    def __call__(self, job: WriteJob) -> None:
        self.started.set()
        self.gate.wait()
        for entry in job.entries:
            name = entry.key.decode()
            if name in self.fail:
                raise OSError(28, "No space left on device")
            (self.directory / name).write_bytes(entry.payload or b"")
            self.order.append(name)


@pytest.fixture
def files(tmp_path):
    return Files(tmp_path)


def test_jobs_are_written_in_the_order_submitted_and_flush_waits_for_them(files):
    writer = DiskWriter(files, max_bytes=1 << 20)
    files.gate.clear()
    for names in (("a", "b"), ("c",), ("d", "e")):
        writer.submit(job(*names))
    assert writer.pending == (3, 50)
    assert writer.flush(timeout=0.05) is False  # the first write is still held
    files.gate.set()
    assert writer.flush() is True
    assert files.order == ["a", "b", "c", "d", "e"] and writer.pending == (0, 0)
    assert (files.directory / "d").read_bytes() == b"d" * 10
    writer.close()


def test_a_removal_has_no_bytes_to_queue():
    removal = WriteJob([Entry(b"gone", None), Entry(b"kept", b"x" * 7)])
    assert removal.nbytes == 7


def test_a_full_queue_holds_the_producer_until_the_writer_catches_up(files):
    writer = DiskWriter(files, max_bytes=25)
    files.gate.clear()
    writer.submit(job("a"))  # taken by the writer, held at the gate
    files.started.wait()
    writer.submit(job("b"))  # 20 bytes queued
    third = threading.Thread(target=writer.submit, args=(job("c"),))
    third.start()
    third.join(timeout=0.2)
    assert third.is_alive() and writer.pending == (2, 20)  # 30 > 25: it waits for room
    files.gate.set()
    third.join()
    assert writer.flush() and files.order == ["a", "b", "c"]
    writer.close()


def test_one_job_larger_than_the_whole_queue_is_still_admitted(files):
    writer = DiskWriter(files, max_bytes=5)
    writer.submit(job("big", size=100))  # an empty queue always admits one job
    assert writer.flush() and files.order == ["big"]
    writer.close()


def test_a_failing_write_is_logged_and_the_writer_goes_on(files, caplog):
    files.fail = {"bad"}
    writer = DiskWriter(files, max_bytes=1 << 20)
    with caplog.at_level(logging.ERROR, logger="kvtier.writer"):
        writer.submit(job("first"))
        writer.submit(job("bad", "after-bad"))
        writer.submit(job("last"))
        assert writer.flush()
    assert files.order == ["first", "last"]  # the failed job's entries were not written
    failures = [r for r in caplog.records if r.name == "kvtier.writer"]
    assert [r.getMessage() for r in failures] == ["writing 2 cache entries failed"]
    assert isinstance(failures[0].exc_info[1], OSError)  # with the cause, not just a count
    assert writer.pending == (0, 0)
    writer.close()


def test_close_writes_every_queued_job_then_stops_the_thread(files):
    writer = DiskWriter(files, max_bytes=1 << 20)
    files.gate.clear()
    for name in ("a", "b", "c"):
        writer.submit(job(name))
    closing = threading.Thread(target=writer.close)
    closing.start()
    closing.join(timeout=0.2)
    assert closing.is_alive()  # waiting for the queued writes, not dropping them
    files.gate.set()
    closing.join()
    assert files.order == ["a", "b", "c"]
    assert sorted(p.name for p in files.directory.iterdir()) == ["a", "b", "c"]
    assert not writer._thread.is_alive()
