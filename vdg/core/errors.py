"""Every error vdg raises for the user's input or environment, under one base, `VdgError`.

Scripts print a `VdgError` as one `error: <message>` line and exit with status 2 (`vdg.core.cli`); anything else
is a bug in vdg and keeps its traceback. Each class also derives from the built-in exception a caller would
expect (a missing data folder is a FileNotFoundError, a full disk an OSError), so `except OSError` still works.
Plumbing only: imports nothing from vdg. The modules that raise these re-export them where they were defined
before (`vdg.run.config.ConfigError`, ...), so existing imports keep working.
"""

from __future__ import annotations

import re
from typing import Any


class VdgError(Exception):
    """Caused by the input or the environment, not by vdg: the message names the key, file or value and the fix."""


class ConfigError(VdgError, ValueError):
    """A config value is outside what vdg accepts; the message names the key and the allowed values."""


class CheckpointError(VdgError, ValueError):
    """A checkpoint is missing, corrupt, unsafe, or belongs to another method or architecture."""


class StorageError(VdgError, OSError):
    """A record could not be written (full disk, quota, read-only file system, permissions); the previous
    version of the file, if any, is intact."""


class RunDirError(VdgError, RuntimeError):
    """The run directory cannot be used: another process holds it, or it is not a writable folder."""


class DataNotFoundError(VdgError, FileNotFoundError):
    """The data a config asks for is not on disk (and could not be downloaded)."""


class DatasetError(VdgError, ValueError):
    """The data on disk contradicts the config or itself (class lists, class count, stray or dangling files)."""


class ImageReadError(VdgError, OSError):
    """An image file cannot be decoded correctly; the message names the file and what is wrong with it.

    Raised inside a DataLoader worker, it reaches the main process rebuilt from the worker's formatted
    traceback: the constructor keeps only the original one-line message, so scripts can print it as it is.
    """

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str) and "Original Traceback" in args[0]:
            last = args[0].strip().splitlines()[-1]
            match = re.match(r"^[\w.]*ImageReadError: (.*)$", last)
            args = (f"{match.group(1) if match else last} (in a DataLoader worker)",)
        super().__init__(*args)


class TeacherError(VdgError, ValueError):
    """A teacher file is missing, unreadable, of an unknown or unexpected format, or does not fit its network."""


class NonFiniteLossError(VdgError, FloatingPointError):
    """Training stopped because a loss term became NaN or Inf."""


class Interrupted(VdgError, RuntimeError):
    """A command stopped by SIGINT or SIGTERM; the message says what is complete and how to carry on."""


class RecordError(VdgError, ValueError):
    """A result record (an evaluation JSON, a summary) is unreadable, or none exists where a report needs one."""
