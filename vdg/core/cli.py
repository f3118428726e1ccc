"""The scripts' boundary with the user: every user error becomes one `error: <message>` line with exit status 2
(vdg's own `VdgError`s, and Hydra's, OmegaConf's and the file system's errors caused by the command line), a
stopped run one line with 130; plus the command line's plumbing (option splitting, paths with '=' quoted).

Plumbing only: imports nothing from vdg above core, composes no config (that is `vdg.run.cli`), holds no science.
Importing it is cheap (no torch): Lightning's error type is imported on first use, so a sweep's dry run stays fast.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from vdg.core.errors import ConfigError, Interrupted, VdgError

USER_ERROR_STATUS = 2

# Config keys whose values are file-system paths: a path may contain '=' (old `epoch=0009.ckpt` checkpoints,
# run directories named `td=0.3`), which Hydra's override grammar only takes quoted.
PATH_KEYS = ("ckpt", "run_dir", "data.root", "data.cache_dir", "results_dir", "out_dir", "output")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input (config, data, checkpoint, storage) or a stopped run: scripts print
    `error: <message>` and exit 2 (`exit_with`) instead of a traceback. Every vdg one is a `VdgError`; Lightning
    reports a Trainer setting the machine cannot honour (e.g. `trainer.accelerator=gpu` without one) as a
    MisconfigurationException."""
    # heavy: lightning_fabric imports torch, and a sweep's dry run (scripts/pretrain.py) lists its jobs without it
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    return (VdgError, MisconfigurationException)


def exit_with(err: BaseException) -> NoReturn:
    """A user error as one `error: <message>` line on stderr, exit status 2 (a usage error, as argparse's).

    The SystemExit keeps the line as its message (what callers and tests see) and 2 as its exit code."""
    line = f"error: {err}"
    print(line, file=sys.stderr, flush=True)
    stop = SystemExit(line)
    stop.code = USER_ERROR_STATUS
    raise stop


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
    value = options[key]
    if not re.fullmatch(r"[+-]?\d+", value.strip()) or int(value) < low:
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}")
    return int(value)


def as_user_error(err: BaseException) -> VdgError | None:
    """The user error behind an exception, or None when it is a bug (which keeps its traceback).

    Translated at this boundary: Hydra's composition errors (an unknown group option or key), OmegaConf's (a
    `${...}` interpolation naming no key or environment variable, a value of the wrong type) and an OSError on a
    path (a name the file system refuses, a permission): each becomes one line that names the key or the path.
    `VDG_TRACEBACK=1` keeps the traceback of everything but vdg's own errors.
    """
    from lightning_fabric.utilities.exceptions import MisconfigurationException  # heavy: imports torch (see above)

    if isinstance(err, VdgError):
        return err
    if os.environ.get("VDG_TRACEBACK"):  # a maintainer debugging: every exception keeps its traceback
        return None
    if isinstance(err, MisconfigurationException):
        return ConfigError(str(err))
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None)
        lines = [line for line in str(err).splitlines() if line.strip()]
        message = lines[0] if lines else type(err).__name__
        where = f"{key}: " if key else ""
        fix = ""
        if "nterpolation" in type(err).__name__ or "${" in message:
            fix = ("; a ${...} value must name an existing config key or, as ${oc.env:NAME}, a set environment "
                   "variable")
        return ConfigError(f"{where}{message}{fix}")
    if isinstance(err, HydraException):
        lines = [line for line in str(err).splitlines() if line.strip()]
        return ConfigError(" ".join(lines[:2]) if lines else type(err).__name__)
    if isinstance(err, OSError) and err.filename:
        reason = err.strerror or str(err)
        return ConfigError(f"{err.filename}: {reason}; check the path given on the command line or in the config")
    return None


def report_user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a script's task (inside @hydra.main, or called directly): a user error is one `error:` line with
    exit status 2, a stopped run one line with 130, anything else its traceback."""

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Interrupted as err:  # never exit 0: a job chain must not go on with an unfinished run
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as err:
            problem = as_user_error(err)
            if problem is None:
                raise
            exit_with(problem)

    return run


def exit_on_user_error(main: Any, *args: Any) -> Any:
    """Run a script's `main` (one not wrapped by @hydra.main) under `report_user_errors`."""
    return report_user_errors(main)(*args)


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
