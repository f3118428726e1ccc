"""vdg: VICReg-Dual-Gating — one ResNet encoder trained as a dense and a channel-gated network."""

__version__ = "0.1.0"
