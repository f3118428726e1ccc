"""The Hydra side of the thin scripts in scripts/: a command line checked, and composed once with vdg's configs,
before Hydra reads it, so that every mistake in it is one `error:` line with exit status 2.

The exit-on-user-error plumbing itself is `vdg.core.cli`. No science and no config defaults here; each script
keeps its own options.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vdg.core.cli import as_user_error, exit_with, quote_path_values
from vdg.core.errors import ConfigError
from vdg.core.paths import CONFIG_DIR


def command_line(argv: list[str], config_name: str | None = None, config_dir: str | Path | None = None) -> list[str]:
    """A Hydra script's arguments, checked before Hydra sees them, so that every mistake in them is one `error:`
    line with exit status 2 (Hydra's own report is a lexer message and a link, or several lines and exit 1):

    - paths with '=' quoted (`quote_path_values`);
    - every override read with Hydra's grammar;
    - with `config_name`, the config composed once with them (an unknown group option or key), except for
      multirun sweeps and Hydra's own flags, which Hydra composes per job. `config_dir` is the folder the
      script's @hydra.main reads (a fork's own configs/), vdg's configs/ by default.
    """
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
