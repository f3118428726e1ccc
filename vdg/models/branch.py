"""The two networks one VDG encoder serves: named branches, never integer flags."""

from __future__ import annotations

from enum import Enum

from vdg.core.errors import ConfigError


class Branch(str, Enum):
    """Which network a forward pass runs: the full dense network or the channel-gated sub-network."""

    DENSE = "dense"
    GATED = "gated"

    @classmethod
    def parse(cls, value: str | Branch) -> Branch:
        try:
            return cls(value)
        except ValueError:
            allowed = [b.value for b in cls]
            raise ConfigError(f"unknown branch {value!r}; allowed values: {allowed}") from None
