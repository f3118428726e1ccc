"""Learning-rate schedules as pure functions of the epoch (or step), wrapped for torch's LambdaLR.

Numbers only; building optimizers and param groups happens in `vdg.optim.param_groups`.
"""

from __future__ import annotations

import math

SCHEDULERS = ("warmup_cosine", "constant")
INTERVALS = ("epoch", "step")


def warmup_cosine(
    t: float, warmup: float, total: float, start_lr: float, base_lr: float, min_lr: float
) -> float:
    """Linear warm-up from `start_lr` then half-cosine from `base_lr` to `min_lr` (bolts' closed form).

    With per-epoch stepping (the official code): t=0 -> start_lr, t = warmup - 1 -> base_lr (reached one
    epoch before the cosine starts), t = warmup -> base_lr, t = total -> min_lr.
    """
    if t < warmup:
        if warmup <= 1:
            return base_lr
        return start_lr + t * (base_lr - start_lr) / (warmup - 1)
    progress = (t - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
