"""The learning-rate schedule: linear warm-up, then cosine or linear decay to 0.

Shapes follow Hugging Face's ``get_{cosine,linear}_schedule_with_warmup`` (the references our
users compare loss curves with): the multiplier at optimizer step ``s`` is ``s / warmup`` during
warm-up (so step 0 runs at lr 0), then decays from 1 at ``s = warmup`` to 0 at ``s = total``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flagopt.errors import TrainerConfigError

SCHEDULES = ("cosine", "linear")


def warmup_steps(warm_up: float, total_steps: int) -> int:
    """Warm-up length in steps: ``warm_up < 1`` is a fraction of ``total_steps``, ``>= 1`` a
    number of steps (an integer)."""
    if isinstance(warm_up, bool) or not isinstance(warm_up, (int, float)) or warm_up < 0:
        raise TrainerConfigError(f"warm_up={warm_up!r}; expected a fraction in [0, 1) of the "
                                 f"total steps or a whole number of steps >= 1")
    if warm_up < 1:
        return int(warm_up * total_steps)
    if warm_up != int(warm_up):
        raise TrainerConfigError(f"warm_up={warm_up!r}; values >= 1 are a number of steps and "
                                 f"must be whole (or pass a fraction < 1)")
    return int(warm_up)


def lr_multiplier(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """``step -> factor`` for ``torch.optim.lr_scheduler.LambdaLR``."""
    if kind not in SCHEDULES:
        raise TrainerConfigError(f"lr_scheduler={kind!r}; expected one of {SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor
