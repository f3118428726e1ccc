"""vdg: VICReg-Dual-Gating — one ResNet encoder trained as a dense and a channel-gated network.

`vdg.load_backbone(path)` loads a backbone exported by scripts/export.py (imported on first use, so that
`import vdg` stays free of torch).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_backbone"]


def __getattr__(name: str) -> Any:
    if name == "load_backbone":
        # heavy: the deploy layer imports torch; `import vdg` (and the scripts' sweep dry runs) stay free of it
        from vdg.deploy.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'vdg' has no attribute {name!r}")
