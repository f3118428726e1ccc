"""Where vdg's own files live: the Hydra config tree every script and check composes. Plumbing only."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
