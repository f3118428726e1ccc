"""Where vdg's own files live: the Hydra config tree every script and check composes. Plumbing only.

configs/ sits at the top of a checkout and ships inside an installed package as vdg/configs/ (setup.py); this
module finds whichever exists. A folder without the configs is an error, never a check silently skipped.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from vdg.core.errors import ConfigError


def config_dir_candidates() -> list[Path]:
    """Where the configs may be: inside the installed package, or next to vdg/ in a checkout (editable install,
    or vdg on PYTHONPATH). Both are relative to the vdg package imported, never to the working directory."""
    package = Path(str(files("vdg")))
    return [package / "configs", package.parent / "configs"]


def find_config_dir(candidates: list[Path] | None = None) -> Path:
    """The first candidate folder that holds pretrain.yaml; a ConfigError naming every folder tried otherwise."""
    candidates = config_dir_candidates() if candidates is None else candidates
    for folder in candidates:
        if (folder / "pretrain.yaml").is_file():
            return folder.resolve()
    tried = ", ".join(str(folder) for folder in candidates)
    raise ConfigError(
        f"vdg's config folder is missing: no pretrain.yaml in {tried}. Install vdg from a checkout that has "
        f"configs/ (`pip install .` ships it as vdg/configs/), or run from such a checkout"
    )


CONFIG_DIR = find_config_dir()


def config_file(*parts: str) -> Path:
    """CONFIG_DIR/<parts>, a file a check reads: missing (a broken install), it is a ConfigError naming it."""
    path = CONFIG_DIR.joinpath(*parts)
    if not path.exists():
        raise ConfigError(f"vdg's config folder {CONFIG_DIR} lacks {'/'.join(parts)}: reinstall vdg")
    return path


def script_config_dir(script: str | Path) -> Path:
    """The config tree a script of scripts/ composes (the one rule every script follows): the configs/ folder beside
    scripts/ in the checkout the script was run from, so that a fork's own yaml files count; CONFIG_DIR when that
    checkout has none."""
    beside = Path(script).resolve().parents[1] / "configs"
    return beside.resolve() if (beside / "pretrain.yaml").is_file() else CONFIG_DIR
