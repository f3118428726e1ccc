"""The bottom layer: plumbing that every other layer may use and that imports nothing from vdg."""
