"""Checkpoints that survive crashes: written to a temporary directory, renamed into place, pruned to K.

A checkpoint is ``OUTPUT_DIR/checkpoints/step-00000123/``: Accelerate's ``save_state`` (model,
optimizer, scheduler, RNG states) plus ``trainer_state.json`` (epoch, step, history, early-stopping
state). A directory is only ever visible under its final name once it is complete, so a crash mid-save
leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary and foreign directories are ignored."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


@dataclass
class LoopState:
    """Where the training loop is: what a checkpoint carries besides the weights, optimizer and RNG states."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best: float | None = None  # best value of the monitored validation metric so far
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    stopped_early: bool = False
    # why the loop ended: "patience" (early stopping), "epochs" (the last epoch), "max_steps", "max_minutes"
    stopped_because: str | None = None
    train_seconds: float = 0.0  # time in forward/backward/step, not in evaluation or checkpointing
    train_samples: int = 0
    history: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"train_loss": [], "validation": []})


def read_state(checkpoint: Path) -> LoopState:
    return LoopState(**json.loads((checkpoint / STATE_FILE).read_text()))


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: LoopState, keep: int) -> Path:
    """Save the full training state atomically and keep only the newest ``keep`` checkpoints.

    Every process must call this (Accelerate gathers what it needs); only the main process renames.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        state_path = tmp / STATE_FILE
        with state_path.open("w") as fh:
            json.dump(asdict(state), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
