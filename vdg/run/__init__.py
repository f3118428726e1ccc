"""The run: everything that turns a config into a trained checkpoint on disk, and nothing of the science.

driver (config -> data, method, Trainer -> run directory), config validation, callbacks, checkpoints (safe
loading, atomic writes, resume checks), loggers, progress output and what the command-line scripts share.
"""
