"""The run directory as a resource one process owns: an exclusive lock naming its holder, checks that the
directory can be written, and undoing its creation when a run is refused. It never decides what a run writes.

The lock is an advisory `fcntl` lock on `<run_dir>/.vdg.lock`, which the kernel (or the NFS server, when the
holder's host dies) releases when the holder dies, however it dies: a stale lock is simply free. The file also
records who holds it (pid, host, start time, command) for the message a second process prints. On file systems
without fcntl locks (some Lustre mounts, NFS without lockd) it falls back to an exclusive-create lock file: a
holder on this host that is no longer running is detected and taken over; one on another host cannot be
checked from here, and the message says how to remove it. Plumbing only: imports nothing from vdg above core.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vdg.core.atomic import host_name, pid_alive, storage_error
from vdg.core.errors import RunDirError

LOCK_NAME = ".vdg.lock"
# fcntl lock calls on file systems that do not implement them fail with one of these
NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _process_start(pid: int) -> str | None:
    """Boot id + start time of a process on this host (Linux): tells a live holder from a reused pid."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, starttime, after the command name
    except (OSError, IndexError):
        return None


def holder_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": host_name(),
        "process_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:500],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0") if os.environ.get("SLURM_JOB_ID") else None,
    }


def describe_holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process (it has not written its name yet)"
    text = f"pid {record.get('pid')} on host {record.get('host')}"
    if record.get("slurm_job_id"):
        text += f" (SLURM job {record['slurm_job_id']})"
    if record.get("started"):
        text += f" since {record['started']}"
    if record.get("command"):
        text += f": {record['command'][:200]}"
    return text


def holder_is_dead(record: dict[str, Any] | None) -> bool:
    """True only when the holder is certainly gone: a process of this host that no longer runs (or whose pid
    now belongs to a younger process), or an earlier attempt of this very SLURM job (a requeued job restarts,
    possibly on another node, only once the previous attempt has ended). Any other holder on another host is
    never declared dead from here."""
    if not record:
        return False
    job = os.environ.get("SLURM_JOB_ID")
    if job and record.get("slurm_job_id") == job:
        try:
            if int(record.get("slurm_restart_count") or 0) < int(os.environ.get("SLURM_RESTART_COUNT", "0")):
                return True
        except ValueError:
            pass
    if record.get("host") != host_name():
        return False
    pid = int(record.get("pid", -1))
    if pid <= 0 or not pid_alive(pid):
        return True
    recorded, now = record.get("process_start"), _process_start(pid)
    return recorded is not None and now is not None and recorded != now


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class RunDirLock:
    """Exclusive ownership of one run directory for the lifetime of a run (a context manager).

    `acquire()` fails at once with a `RunDirError` naming the holder when another live process has it.
    `release(restore=True)` (a refused run) puts the lock file back as it was, or removes it when this process
    created it, so that a refused run leaves the directory as it found it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self._previous: bytes | None = None  # the lock file's bytes before we took it (None: it did not exist)
        self._exclusive_file = False

    def acquire(self) -> RunDirLock:
        for _ in range(10):  # the lock file may be replaced under us by a releasing holder: retry
            existed = self.path.exists()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise (storage_error(self.path, err) or err) from err
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    self._busy(_read_record(self.path))
                if err.errno in NO_LOCKING:
                    return self._acquire_exclusive_file()
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder just removed: try again on the current one
                os.close(fd)
                continue
            self._fd = fd
            self._previous = os.pread(fd, 1 << 16, 0) if existed else None
            self._write_record(created=not existed)
            return self
        raise RunDirError(f"could not take the lock {self.path}: it keeps being replaced")

    def _acquire_exclusive_file(self) -> RunDirLock:
        """Fallback without fcntl: O_EXCL creation; a dead holder of this host is taken over."""
        self._exclusive_file = True
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                record = _read_record(self.path)
                if not holder_is_dead(record):
                    self._busy(record, fallback=True)
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, stale)
                except FileNotFoundError:
                    continue
                if _read_record(stale) != record:  # another process replaced it meanwhile: give it back
                    with contextlib.suppress(OSError):
                        os.link(stale, self.path)
                    stale.unlink(missing_ok=True)
                    self._busy(_read_record(self.path), fallback=True)
                self._previous = stale.read_bytes()
                stale.unlink(missing_ok=True)
                continue
            self._fd = fd
            self._write_record(created=True)
            return self
        raise RunDirError(f"could not take the lock {self.path}")

    def _busy(self, record: dict[str, Any] | None, fallback: bool = False) -> None:
        message = (
            f"run directory {self.path.parent} is in use by {describe_holder(record)}. Two processes must not "
            f"train into one run directory: wait for that run to end, or choose another run_dir"
        )
        if fallback and record and record.get("host") != host_name():
            message += (
                f". This file system has no fcntl locks, so a holder on another host cannot be checked from here: "
                f"if that process is gone, delete {self.path}"
            )
        raise RunDirError(message)

    def _write_record(self, created: bool) -> None:
        """Our name in the lock file; on a full disk the lock is given back as it was and a StorageError raised."""
        data = (json.dumps(holder_record()) + "\n").encode()
        try:
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
            os.fsync(self._fd)
        except OSError as err:
            self.release(restore=not created)
            raise (storage_error(self.path, err) or err) from None

    def release(self, restore: bool = False) -> None:
        """Give the directory back. restore=True: leave the lock file as it was before `acquire`."""
        if self._fd is None:
            return
        try:
            if restore and self._previous is not None:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, self._previous, 0)
            else:
                # removed while still locked, so no one can lock this inode after us and believe it current
                self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or vanished directory: the kernel lock goes away with the descriptor anyway
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_writable(folder: str | Path, key: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written: `key` names the config key.

    The nearest existing folder gets a real probe (a temp file created and removed at once): permission bits
    say nothing for root, ACLs, NFS root squash or a read-only mount.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{key}={str(folder)!r} exists and is not a folder")
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"{key}={str(folder)!r} cannot be created: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".vdg-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "read-only file system" if _read_only(existing) else (err.strerror or str(err)).lower()
        where = "is not writable" if existing == folder else f"cannot be created in {existing}"
        raise RunDirError(f"{key}={str(folder)!r} {where} ({reason})") from None


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def create_dirs(folder: str | Path) -> list[Path]:
    """mkdir -p that returns the folders it created (deepest last), to undo them if the run is refused."""
    folder = Path(folder)
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise (storage_error(path, err) or err) from err
        created.append(path)
    return created


def remove_created(created: list[Path]) -> None:
    """Undo `create_dirs`: remove the folders it made, deepest first, if they are still empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return
