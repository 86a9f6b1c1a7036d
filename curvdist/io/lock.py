"""The run lock: one writer per (``out``, run id), and a lock that a crashed writer does not leave stuck.

    with run_lock("out/quickstart", "tiny-gpt2-75e0c44df8"):   # raises RunLocked if a live writer holds it
        ...                                                     # measure and write

The lock is the file ``OUT/.lock-<run_id>.json`` ({run_id, host, pid, pid_start, started_at}), created with
``O_EXCL`` so two writers cannot both get it.  Different run ids have different locks, so they write one ``out`` at
the same time (their files live in their own ``run_id=`` partitions).  While held, a daemon thread touches the file
every :data:`HEARTBEAT_S`.  A lock is stale, and is taken over with a warning, when

* its owner ran on this host and that process is gone (its pid is not running, or is running but started at
  another time: the pid was reused), or
* its owner ran on another host (whose processes cannot be seen from here) and the file has not been touched
  for :data:`STALE_OTHER_HOST_S` (the owner's heartbeat stopped: the owner or its node died), or
* its owner ran on another host in the same SLURM job (``SLURM_JOB_ID``): the job was requeued (preemption, time
  limit), and SLURM never runs two incarnations of one job at once.

Taking over a stale lock is serialised by ``flock`` on the empty file ``OUT/.lock-guard``.  Hidden names (a
leading ``.``) are skipped by every reader of the dataset.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

HEARTBEAT_S = 30.0             # a held lock's file is touched this often
STALE_OTHER_HOST_S = 600.0     # a lock of another host untouched this long is stale (20 missed heartbeats)


class RunLocked(FileExistsError):
    """Another live process is writing the same run id into the same ``out``."""


class StaleLockWarning(UserWarning):
    """A lock left by a writer that is gone was taken over."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run lock."""
    run_id: str
    host: str
    pid: int
    pid_start: str | None      # the process's start time (Linux /proc), to tell a reused pid apart
    started_at: str            # ISO 8601, UTC
    job: str | None = None     # SLURM_JOB_ID: a requeued job runs again under the same id

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started_at}"


def lock_path(out: str | os.PathLike, run_id: str) -> Path:
    return Path(out) / f".lock-{run_id}.json"


def _pid_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]   # field 22, counted after the command name


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def stale_reason(owner: LockOwner, age_s: float, host: str | None = None) -> str | None:
    """Why the lock of ``owner`` (file untouched for ``age_s``) is stale, or None when its owner may be alive."""
    host = host or socket.gethostname()
    if owner.host == host:
        if not _pid_running(owner.pid):
            return f"process {owner.pid} is no longer running"
        now = _pid_start(owner.pid)
        if owner.pid_start and now and now != owner.pid_start:
            return f"process {owner.pid} is no longer running (its pid now belongs to another process)"
        return None
    if owner.job and owner.job == os.environ.get("SLURM_JOB_ID"):
        return f"it is an earlier incarnation of SLURM job {owner.job} (requeued)"
    if age_s > STALE_OTHER_HOST_S:
        return f"its heartbeat stopped {age_s / 60:.0f} min ago (limit {STALE_OTHER_HOST_S / 60:.0f} min)"
    return None


def _read(path: Path) -> tuple[LockOwner | None, float]:
    """The owner recorded in ``path`` (None if unreadable: a writer died between create and write) and its age."""
    try:
        age = time.time() - path.stat().st_mtime
        return LockOwner(**json.loads(path.read_text())), age
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError):
        return None, age


def holder(out: str | os.PathLike, run_id: str) -> LockOwner | None:
    """The live writer of ``run_id`` in ``out``: the owner of its lock unless the lock is absent or stale."""
    try:
        owner, age = _read(lock_path(out, run_id))
    except FileNotFoundError:
        return None
    return owner if owner is not None and stale_reason(owner, age) is None else None


class RunLock:
    """The lock of one run id in one ``out``, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, out: str | os.PathLike, run_id: str):
        self.out, self.run_id = Path(out), run_id
        self.path = lock_path(out, run_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_out = False

    def acquire(self) -> RunLock:
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self._created_out = True
        me = LockOwner(self.run_id, socket.gethostname(), os.getpid(), _pid_start(os.getpid()),
                       dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), os.environ.get("SLURM_JOB_ID"))
        # the check-and-take of a stale lock is serialised between takers on this file system
        with _guard(self.out):
            try:
                self._create(me)
            except FileExistsError:
                self._take_over_or_refuse(me)
        self._thread = threading.Thread(target=self._heartbeat, name=f"curvdist-lock-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _create(self, me: LockOwner) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(me)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _take_over_or_refuse(self, me: LockOwner) -> None:
        try:
            owner, age = _read(self.path)
        except FileNotFoundError:   # released meanwhile
            self._create(me)
            return
        reason = "the lock file is unreadable (its writer died while creating it)" if owner is None and age > 60 \
            else stale_reason(owner, age) if owner is not None else None
        if reason is None:
            who = owner.describe() if owner else "a process that is creating it now"
            raise RunLocked(
                f"out='{self.out}' is being written by another run with run_id {self.run_id!r} ({who}; lock "
                f"{self.path}); wait for it to finish, or write to another out or run_id. If that process is gone "
                f"for good (a node that died), delete {self.path}")
        warnings.warn(StaleLockWarning(
            f"taking over the lock of run_id {self.run_id!r} in {self.out} left by "
            f"{owner.describe() if owner else 'an unknown writer'}: {reason}"), stacklevel=3)
        self.path.unlink(missing_ok=True)
        self._create(me)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        owner, _ = (None, 0.0)
        with contextlib.suppress(FileNotFoundError):
            owner, _ = _read(self.path)
        if owner is not None and owner.pid == os.getpid() and owner.host == socket.gethostname():
            self.path.unlink(missing_ok=True)
        if self._created_out:   # a run that wrote nothing leaves no directory behind
            with contextlib.suppress(OSError):
                (self.out / _GUARD).unlink(missing_ok=True)
                self.out.rmdir()


_GUARD = ".lock-guard"


@contextlib.contextmanager
def _guard(out: Path):
    with open(out / _GUARD, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, run_id: str):
    """Hold the lock of ``run_id`` in ``out`` for the block (:class:`RunLock`)."""
    lock = RunLock(out, run_id).acquire()
    try:
        yield lock
    finally:
        lock.release()
