"""Shared plumbing of the thin scripts in scripts/: the boundary where every user error becomes one `error:` line
with exit status 2 (vdg's own `VdgError`s, and Hydra's, OmegaConf's and the file system's errors caused by the
command line), the command line checked before Hydra reads it, option splitting, paths with '=' quoted.

No science and no config defaults here; each script keeps its own options. Importing this module is cheap
(no torch): Lightning's and Hydra's error types are imported on first use, so a sweep's dry run stays fast.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from vdg.core.errors import ConfigError, Interrupted, VdgError
from vdg.core.paths import CONFIG_DIR

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
    from hydra.errors import HydraException
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

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


def command_line(argv: list[str], config_name: str | None = None, config_dir: str | Path | None = None) -> list[str]:
    """A Hydra script's arguments, checked before Hydra sees them, so that every mistake in them is one `error:`
    line with exit status 2 (Hydra's own report is a lexer message and a link, or several lines and exit 1):

    - paths with '=' quoted (`quote_path_values`);
    - every override read with Hydra's grammar;
    - with `config_name`, the config composed once with them (an unknown group option or key), except for
      multirun sweeps and Hydra's own flags, which Hydra composes per job. `config_dir` is the folder the
      script's @hydra.main reads (a fork's own configs/), vdg's configs/ by default.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    argv = quote_path_values(argv)
    parser = OverridesParser.create()
    overrides = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:  # flags (-m, --cfg job, ...) and their values
            continue
        try:
            parser.parse_override(arg)
        except HydraException as err:  # the lexer's and parser's errors
            reason = str(err).strip().splitlines()[0]
            exit_with(ConfigError(
                f"cannot read the override {arg!r} ({reason}); write key=value, and quote a value that holds "
                f"brackets, braces, commas, quotes or spaces: 'key=\"...\"'"))
        if not arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            overrides.append(arg)
    if config_name is None or any(a.startswith("-") for a in argv):
        return argv
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as err:
        first = str(err).strip().splitlines()[0]
        options = f"; allowed values: {sorted(err.options)}" if getattr(err, "options", None) else ""
        exit_with(ConfigError(f"{first}{options}"))
    except (HydraException, OmegaConfBaseException) as err:
        unknown = re.match(r"Could not override '([^']+)'", str(err))
        if unknown:
            exit_with(ConfigError(unknown_key_message(unknown.group(1), config_name, config_dir or CONFIG_DIR)))
        exit_with(as_user_error(err) or ConfigError(str(err)))
    return argv


def unknown_key_message(key: str, config_name: str, config_dir: str | Path = CONFIG_DIR) -> str:
    """'unknown key K (did you mean ...?)', the suggestion drawn from the keys of the composed default config."""
    import difflib

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        defaults = OmegaConf.to_container(compose(config_name=config_name), resolve=False)

    def keys(node: Any, prefix: str = "") -> list[str]:
        if not isinstance(node, dict):
            return [prefix[:-1]]
        return [k for name, child in node.items() for k in keys(child, f"{prefix}{name}.")]

    close = difflib.get_close_matches(key, keys(defaults), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (f"unknown key {key}{hint}: configs/{config_name}.yaml and its groups have no such key; prefix it "
            f"with + only to add a key of your own")


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
