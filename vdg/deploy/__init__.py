"""Deployment: one trained network as a standalone backbone (export, `load_backbone`) and ways to execute it.

It reads checkpoints and exports; it never trains.
"""
