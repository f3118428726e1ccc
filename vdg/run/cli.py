"""Shared plumbing of the thin scripts in scripts/: which errors are the user's, and option splitting.

No science and no config defaults here; each script keeps its own options.
"""

from __future__ import annotations

from vdg.data.datasets import DataNotFoundError
from vdg.models.teachers import TeacherError
from vdg.run.callbacks import NonFiniteLossError
from vdg.run.checkpoint import CheckpointError
from vdg.run.config import ConfigError

# Errors caused by input (config, data, checkpoint) or a diverged run: scripts print `error: <message>` and exit 1
# instead of a traceback.
USER_ERRORS = (CheckpointError, ConfigError, DataNotFoundError, NonFiniteLossError, TeacherError)


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
