"""Atomic file writes for everything vdg records (checkpoints, metrics, summaries, exports, results): a file is
either the previous one or the new one, never half of one, and a failed write says why in one line.

It only writes files; what goes into them is the caller's business. Temp files are named
`.<name>.tmp-<pid>-<host>` so that a later run can tell whether their writer is still alive and remove orphans.
Plumbing only: imports nothing from vdg above core.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from vdg.core.errors import StorageError

TEMP_PATTERN = re.compile(r"\.tmp-(?P<pid>\d+)(?:-(?P<host>.+))?$")
# errno values that mean "this storage cannot take the write" rather than a bug
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for this file system",
}


def host_name() -> str:
    return socket.gethostname() or "localhost"


def temp_path(path: str | Path) -> Path:
    """`<folder>/.<name>.tmp-<pid>-<host>`: hidden, in the target's folder (so os.replace stays atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{host_name()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(folder: str | Path, any_writer: bool = False) -> list[Path]:
    """Delete temp files in `folder` left by killed writers; returns what was removed.

    A temp file is removed when its writer (pid and host in its name) is a dead process on this host, or, with
    `any_writer=True` (the caller holds the run-directory lock, so nobody else writes there), whatever wrote it.
    Temp files of live processes and of other hosts are left alone.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    here = host_name()
    for path in folder.iterdir():
        match = TEMP_PATTERN.search(path.name)
        if match is None or not path.is_file():
            continue
        host = match["host"]
        dead = (host is None or host == here) and not pid_alive(int(match["pid"]))
        if any_writer or dead:
            try:
                path.unlink()
                removed.append(path)
            except OSError:  # gone already, or not ours to delete: leave it
                pass
    return removed


def _errno_of(err: BaseException) -> int | None:
    """The errno behind `err`: its own, one in its cause/context chain (torch.save wraps the OSError of the
    file object in a RuntimeError from inline_container.cc), or one quoted as '(os error N)' (safetensors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno
        quoted = re.search(r"os error (\d+)", str(err))
        if quoted:
            return int(quoted.group(1))
        err = err.__cause__ or err.__context__
    return None


def storage_error(path: str | Path, err: BaseException) -> StorageError | None:
    """A one-line StorageError for a failed write of `path`, or None when `err` is not a storage problem."""
    code = _errno_of(err)
    if code not in STORAGE_ERRNOS:
        return None
    path = Path(path)
    what = STORAGE_ERRNOS[code]
    detail = ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
            detail = f" ({free / 2**20:.1f} MiB free there)"
        except OSError:
            pass
    problem = StorageError(
        f"cannot write {path}: {what}{detail}; the previous version of the file (if any) is intact. "
        f"Fix the storage, then rerun the same command"
    )
    problem.errno = code  # set after: OSError(errno, text) would print as "[Errno 28] text"
    return problem


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """`write(temp)` into `.<name>.tmp-<pid>-<host>` next to `path`, fsync, then os.replace onto `path`.

    The file gets mode 0o666 minus the umask (as `open` would give it), whatever `write` does, so colleagues
    read what the umask lets them read. On failure the temp file is removed, the old file is untouched, and a
    full disk, a quota, a read-only file system or missing permissions become a one-line `StorageError`.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # some writers (safetensors) make their file 0600 themselves
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        problem = storage_error(path, err) if isinstance(err, Exception) else None
        if problem is not None:
            raise problem from err
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)
