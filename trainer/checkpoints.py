"""What every training stage does with its state: resume it, save it atomically, report it."""

from __future__ import annotations

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


def report(metrics: dict[str, Any], export: Path | None) -> None:
    """``metrics`` to Ray Train, with ``export`` (a servable checkpoint directory, or None on
    the workers that do not hand one over) as the checkpoint."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(export)) if export else None
    ray.train.report(metrics, checkpoint=checkpoint)
