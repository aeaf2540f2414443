"""The learning-rate schedule every training stage uses."""

from __future__ import annotations

import math


def warmup_cosine(base_lr: float, step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up over the first ``warmup`` steps, then a cosine decay from ``base_lr`` to
    ``floor * base_lr`` at step ``total`` (held there after it)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def running_loss(average: float, loss: float, share: float = 0.05) -> float:
    """The exponential moving average of the training loss that the stages report: the first
    loss itself (``average`` starts as NaN), then ``(1 - share) * average + share * loss``."""
    return loss if math.isnan(average) else (1 - share) * average + share * loss
