"""Shared plumbing of the thin scripts in scripts/: which errors are the user's, option splitting, and paths
with '=' on the command line.

No science and no config defaults here; each script keeps its own options. Importing this module is cheap
(no torch): `USER_ERRORS` imports the error types on first use, so a sweep's dry run stays fast.
"""

from __future__ import annotations

import re
import sys
from typing import Any, NoReturn

from vdg.core.errors import VdgError

USER_ERROR_STATUS = 2

# Config keys whose values are file-system paths: a path may contain '=' (old `epoch=0009.ckpt` checkpoints,
# run directories named `td=0.3`), which Hydra's override grammar only takes quoted.
PATH_KEYS = ("ckpt", "run_dir", "data.root", "data.cache_dir", "results_dir", "out_dir", "output")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input (config, data, checkpoint, storage) or a stopped run: scripts print
    `error: <message>` and exit 2 (`exit_with`) instead of a traceback. Every vdg one is a `VdgError`; Lightning
    reports a Trainer setting the machine cannot honour (e.g. `trainer.accelerator=gpu` without one) as a
    MisconfigurationException."""
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
    from vdg.core.errors import ConfigError

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
        exit_with(err)


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
