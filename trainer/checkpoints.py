"""What every training stage does with its state: resume it, save it atomically, and at each
checkpoint step export it and report to Ray Train."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "train_state.pt"  # model, optimiser and step under the stage's work directory


def resume_state(work: Path, resume: bool, total: int) -> dict[str, Any] | None:
    """The training state saved under ``work``, when resuming and there is one; else None."""
    path = work / STATE_FILE
    if not (resume and path.is_file()):
        return None
    state: dict[str, Any] = torch.load(path, weights_only=False)
    print(f"resumed from {path} at step {int(state['step'])}/{total}")
    return state


def save_state(work: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically: a crash mid-write leaves the previous one."""
    tmp = work / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(work / STATE_FILE)


def checkpoint(
    work: Path,
    rank: int,
    metrics: dict[str, Any],
    state: dict[str, Any],
    export: Callable[[Path], object],
) -> None:
    """A checkpoint step: rank 0 saves the training ``state`` and ``export``s the servable
    model to ``work/last``; then every worker reports ``metrics`` (Ray Train's report is a
    collective), rank 0 handing over ``work/last`` as the checkpoint."""
    import ray.train

    handed = None
    if rank == 0:
        save_state(work, state)
        export(work / "last")
        handed = ray.train.Checkpoint.from_directory(str(work / "last"))
    ray.train.report(metrics, checkpoint=handed)
