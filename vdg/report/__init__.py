"""Reporting: the paper's tables, its reported numbers, Pareto and channel-usage plots, UMAP and FLOPs reports.

It reads result records and checkpoints; it never trains or evaluates (that is `vdg.run` and `vdg.eval`).
"""
