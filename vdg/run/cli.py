"""Shared plumbing of the thin scripts in scripts/: which errors are the user's, option splitting, and paths
with '=' on the command line.

No science and no config defaults here; each script keeps its own options. Importing this module is cheap
(no torch): `USER_ERRORS` imports the error types on first use, so a sweep's dry run stays fast.
"""

from __future__ import annotations

import re
from typing import Any

# Config keys whose values are file-system paths: a path may contain '=' (old `epoch=0009.ckpt` checkpoints,
# run directories named `td=0.3`), which Hydra's override grammar only takes quoted.
PATH_KEYS = ("ckpt", "run_dir", "data.root", "data.cache_dir", "results_dir", "out_dir", "output")


class Interrupted(RuntimeError):
    """A command stopped by SIGINT or SIGTERM; the message says what is complete and how to carry on."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input (config, data, checkpoint, storage) or a stopped run: scripts print
    `error: <message>` and exit 1 instead of a traceback."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from vdg.data.datasets import DataNotFoundError, DatasetError, ImageReadError
    from vdg.deploy.native import NativeKernelError
    from vdg.models.teachers import TeacherError
    from vdg.run.callbacks import NonFiniteLossError
    from vdg.run.checkpoint import CheckpointError
    from vdg.run.checkpoint_io import StorageError
    from vdg.run.config import ConfigError
    from vdg.run.rundir import RunDirError

    return (CheckpointError, ConfigError, DataNotFoundError, DatasetError, ImageReadError, NonFiniteLossError,
            RunDirError, StorageError, TeacherError, MisconfigurationException, Interrupted, NativeKernelError)


def __getattr__(name: str) -> Any:
    if name == "USER_ERRORS":
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quote_path_values(argv: list[str], keys: tuple[str, ...] = PATH_KEYS) -> list[str]:
    """`ckpt=runs/x/epoch=0009.ckpt` -> `ckpt='runs/x/epoch=0009.ckpt'`, so Hydra reads the path as one value.

    Only values of `keys` that contain '=' and are not quoted already are touched; everything else is kept.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in keys and "=" in value and not re.match(r"^['\"]", value):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            arg = f"{key}={value}"
        out.append(arg)
    return out


def int_option(options: dict[str, str], key: str, low: int = 0) -> int:
    """A script option that must be an integer >= low (`steps=abc` is one clear line, not a traceback)."""
    from vdg.run.config import ConfigError

    value = options[key]
    if not re.fullmatch(r"[+-]?\d+", value.strip()) or int(value) < low:
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}")
    return int(value)


def exit_on_user_error(main: Any, *args: Any) -> Any:
    """Run a script's `main` (one not wrapped by @hydra.main), turning user errors and Hydra's composition
    errors (an unknown group option, a key that does not exist) into `error: <message>` and exit status 1."""
    from hydra.errors import HydraException

    try:
        return main(*args)
    except (*user_errors(), HydraException) as err:
        raise SystemExit(f"error: {err}") from None


def split_options(argv: list[str], defaults: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into a script's own options (keys of `defaults`) and Hydra overrides."""
    options, overrides = dict(defaults), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in defaults:
            options[key] = value
        else:
            overrides.append(arg)
    return options, overrides
