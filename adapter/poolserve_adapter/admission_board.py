"""The admission board: what every adapter worker holds of each model, so that admission judges the whole model.

With several uvicorn workers each process admits its own requests (:mod:`poolserve_adapter.admission`), but
they all queue for the same Triton model on the same GPU. A worker that judged by its own requests alone would
see a fraction of the backlog, and measure a fraction of the model's speed while the others share it. Through
the board each worker publishes, per model, the work it holds (tokens in flight still to do, tokens waiting) and
the rate it measures; a worker deciding on a new request adds the others' backlog to its own and their rates to
its own, so a request is refused only when the model as a whole cannot start it within ``admission_wait_s``.

The board is a folder the launcher creates before spawning the workers (:func:`prepare_board_dir`, exported in
:data:`BOARD_ENV`, on tmpfs where there is one) and removes when it exits. Each worker writes one small record
file per model, named by the model and its pid, with ``pwrite`` (one writer per file: no lock) and a checksum,
since a ``pread`` racing a ``pwrite`` may see half of each; a reader skips a torn record. A worker republishes
at least every :data:`~poolserve_adapter.admission.Admission.REVIEW_INTERVAL_S` while it holds work, so a
record older than :data:`STALE_AFTER_S` is a worker that is gone (or stuck) and counts for nothing, whatever
its pid now names; a record whose process is gone is removed. Monotonic clocks are one clock across processes
on Linux, so a reader ages a record: the work in flight it names is partly done by the time it is read. A
board that disappears (its folder removed under a running adapter) leaves each worker judging its own work,
as a single worker does.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BOARD_ENV = "POOLSERVE_ADMISSION_BOARD"
# in-flight tokens still to do, queued tokens, tokens per second (0: unknown), when written (monotonic seconds),
# then the CRC-32 of those 32 bytes
_FIELDS = struct.Struct("<dddd")
_RECORD = struct.Struct("<ddddI")
# How often a worker lists the board for records of workers that started since.
RESCAN_INTERVAL_S = 1.0
# A record not rewritten for this long belongs to a worker that is gone or stuck: it counts for nothing. Workers
# holding work rewrite theirs every 0.1 s; an idle worker's record says it holds nothing anyway.
STALE_AFTER_S = 5.0


def prepare_board_dir(workers: int) -> None:
    """Call in the launcher before uvicorn spawns ``workers`` workers: with more than one, create a new board
    and export it for them to inherit (one inherited from another adapter is replaced: boards are not shared
    between launchers); it is removed when the launcher exits."""
    if workers <= 1:
        os.environ.pop(BOARD_ENV, None)
        return
    path = tempfile.mkdtemp(prefix="adapter-admission-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.environ[BOARD_ENV] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def board_from_environment() -> AdmissionBoard | None:
    """The board the launcher exported to this worker; None for a single worker."""
    path = os.environ.get(BOARD_ENV)
    return AdmissionBoard(Path(path)) if path else None


@dataclass(frozen=True)
class PeerLoad:
    """The other workers' share of one model: backlog in tokens and the rate of those that hold work."""

    ahead_tokens: float
    rate: float  # tokens per second; 0 when none of them holds work with a known rate



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class AdmissionBoard:
    """The board's folder, and this worker's place on it."""

    def __init__(self, directory: Path, pid: int | None = None, clock: Callable[[], float] = time.monotonic,
                 is_alive: Callable[[int], bool] = _alive):
        self.directory = directory
        # Tests play several workers in one process: their own pids, clock and idea of who is alive.
        self.pid = os.getpid() if pid is None else pid
        self.clock = clock
        self.is_alive = is_alive

    def entry(self, model: str) -> BoardEntry | None:
        """This worker's record of ``model``; None when the board is gone (the worker then judges alone)."""
        try:
            return BoardEntry(self, hashlib.sha256(model.encode()).hexdigest()[:16])
        except OSError as error:
            logger.warning("admission board %s unusable (%s): each adapter worker judges its own work", self.directory,
                           error)
            return None


class BoardEntry:
    """One worker's record of one model, and its view of the other workers' records of it."""

    def __init__(self, board: AdmissionBoard, model_key: str):
        self._directory = board.directory
        self._prefix = f"{model_key}."
        self._clock = board.clock
        self._alive = board.is_alive
        self._own_name = f"{model_key}.{board.pid}"
        self._fd = os.open(self._directory / self._own_name, os.O_RDWR | os.O_CREAT, 0o600)
        self._peers: dict[str, int] = {}  # record file name -> open fd
        self._scanned_at = float("-inf")
        self.publish(0.0, 0, None)

    def publish(self, inflight_left: float, queued_tokens: int, rate: float | None) -> None:
        fields = _FIELDS.pack(inflight_left, float(queued_tokens), rate or 0.0, self._clock())
        os.pwrite(self._fd, fields + struct.pack("<I", zlib.crc32(fields)), 0)

    def peers(self) -> PeerLoad:
        now = self._clock()
        if now - self._scanned_at >= RESCAN_INTERVAL_S:
            self._rescan(now)
        ahead = rate = 0.0
        for name, fd in list(self._peers.items()):
            data = os.pread(fd, _RECORD.size, 0)
            if len(data) < _RECORD.size:  # being created
                continue
            inflight_left, queued, peer_rate, written, checksum = _RECORD.unpack(data)
            if checksum != zlib.crc32(data[:_FIELDS.size]) or now - written > STALE_AFTER_S:
                continue  # read mid-write, or a worker that stopped rewriting it
            # Aged: the peer's work in flight goes on at its rate after it wrote the record.
            inflight_left = max(0.0, inflight_left - peer_rate * max(0.0, now - written))
            if inflight_left + queued >= 1:
                ahead += inflight_left + queued
                rate += peer_rate
        return PeerLoad(ahead, rate)

    def _rescan(self, now: float) -> None:
        self._scanned_at = now
        try:
            names = {name for name in os.listdir(self._directory) if name.startswith(self._prefix)
                     and name != self._own_name and name[len(self._prefix):].isdigit()}
        except FileNotFoundError:  # the board was removed: judge alone
            names = set()
        for name in set(self._peers) - names:
            os.close(self._peers.pop(name))
        for name in names - set(self._peers):
            pid = int(name.rsplit(".", 1)[1])
            if not self._alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._directory / name)  # a worker that died: its work died with it
                continue
            with contextlib.suppress(FileNotFoundError):
                self._peers[name] = os.open(self._directory / name, os.O_RDONLY)
        for name in list(self._peers):
            if not self._alive(int(name.rsplit(".", 1)[1])):
                os.close(self._peers.pop(name))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._directory / name)

    def close(self) -> None:
        for fd in self._peers.values():
            os.close(fd)
        self._peers.clear()
        os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._directory / self._own_name)

