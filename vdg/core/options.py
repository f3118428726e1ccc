"""Typed checks of single config options: each refuses a wrong type or value with one `ConfigError` line that
names the key and what it accepts (seed=1.5 and seed=true are refused, never truncated or coerced).

The bottom layer: every layer validates its own options with these; imports nothing from vdg but its errors.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from vdg.core.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None, note: str = "") -> int:
    """An integer within [low, high]: 1.5, true, '3' are refused (never truncated or coerced)."""
    ok = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f" >= {low}" if high is None and low is not None else f" in [{low}, {high}]" if high else ""
        raise ConfigError(f"{key}={value!r} must be an integer{bounds}{note}")
    return value


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, note: str = "") -> float:
    """A finite number (not a bool, not a string) within the bounds; open bounds exclude the end."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "a finite number" if isinstance(value, float) and not math.isfinite(value) else "a number"
        if low is not None and high is not None:
            bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f" {'>' if low_open else '>='} {low}"
        else:
            bounds = ""
        raise ConfigError(f"{key}={value!r} must be {kind}{bounds}{note}")
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed or isinstance(value, bool):
        raise ConfigError(f"unknown {key} {value!r}; allowed values: {allowed}")
    return value


def check_str(key: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}={value!r} must be a non-empty string{' or null' if optional else ''}")
    return value


def check_rgb(key: str, value: Any, positive: bool = False) -> list[float]:
    """Three finite numbers (per-channel mean or std); a std must be > 0 (it divides)."""
    values = list(value) if isinstance(value, list | tuple | ListConfig) else None
    if values is None or len(values) != 3 or not all(is_number(v) for v in values):
        raise ConfigError(f"{key}={_plain(value)!r} must be a list of 3 numbers (one per RGB channel)")
    if positive and not all(v > 0 for v in values):
        raise ConfigError(f"{key}={_plain(value)!r}: every channel's std must be > 0 (images are divided by it)")
    return [float(v) for v in values]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def check_known_keys(
    section: str, node: Any, allowed: Iterable[str] | None, extra: str = "", shown: Iterable[str] | None = None
) -> None:
    """Refuse keys of `node` that `allowed` lacks (a typo appended with `+key=value` would be ignored).

    The message lists `shown` (default: `allowed`) and then `extra`.
    """
    if allowed is None or not isinstance(node, Mapping | DictConfig):
        return
    allowed = sorted(set(allowed) - {"hydra"})
    prefix = f"{section}." if section else ""
    for key in node:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            listed = sorted(set(shown)) if shown is not None else allowed
            raise ConfigError(f"unknown key {prefix}{key}{hint}; allowed keys: {listed}{extra}")


# The `data:` keys an evaluation-like command may override on this machine (null: the checkpoint's own value)
DATA_OVERRIDE_KEYS = ("root", "download", "num_workers", "pin_memory")


def check_data_overrides(data: Any) -> None:
    """The `data:` block of linear_eval/knn_eval/export/...: only `DATA_OVERRIDE_KEYS`, each null or well typed."""
    data = data or {}
    check_known_keys("data", data, DATA_OVERRIDE_KEYS)
    if data.get("root") is not None:
        check_str("data.root", data.root)
    for key in ("download", "pin_memory"):
        if data.get(key) is not None:
            check_bool(f"data.{key}", data[key])
    if data.get("num_workers") is not None:
        check_int("data.num_workers", data.num_workers, 0)


