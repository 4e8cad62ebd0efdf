"""Crash-safe training checkpoints: everything needed to continue a run exactly.

Layout under ``OUT/checkpoints/``::

    latest.json            {"checkpoint": "step-00000120", "step": 120, "final": false}
    step-00000120/
        model.safetensors  the model's tensors (tied ones stored once)
        trainer.pt         optimizer state, RNG states, data-source state (tensors, ints, lists)
        state.json         step, tokens, elapsed seconds, ... (also human-readable)

A checkpoint directory is written under a temporary name, fsynced and renamed into place; only
then does ``latest.json`` (written atomically) point at it, and only after that are older ones
removed. A ``kill -9`` at any moment therefore leaves ``latest.json`` naming a complete
checkpoint. Leftover temporary folders, and checkpoints newer than the pointer (a kill between
the rename and the pointer update), are removed by :func:`remove_orphans` when a run resumes.

Loading reads safetensors and ``torch.load(weights_only=True)`` only: never arbitrary pickles.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RunError
from ..utils.io import atomic_directory, atomic_write_json
from ..utils.oserrors import as_os_error, save_torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its folder, optimizer step, and whether the run ended there."""

    path: Path
    step: int
    final: bool


def step_dir_name(step: int) -> str:
    """``step-00000120`` for step 120 (sorts by step)."""
    return f"step-{step:08d}"


def save_checkpoint(root: str | os.PathLike, step: int, *, model: nn.Module,
                    trainer_state: dict[str, Any], info: dict[str, Any], final: bool = False,
                    keep: int = 1) -> CheckpointInfo:
    """Write a checkpoint of ``step`` atomically and point ``latest.json`` at it.

    Args:
        root: the ``checkpoints`` folder.
        model: the plain module (not DDP / compiled); saved with safetensors.
        trainer_state: tensors and plain values for ``trainer.pt`` (optimizer, RNG, data).
        info: JSON-ready values for ``state.json`` (step, tokens, elapsed, ...).
        final: the run ended at this step.
        keep: how many checkpoints to keep (the newest ones; at least 1).

    A checkpoint already present for ``step`` (a periodic save at the last step) is reused.
    """
    root = Path(root)
    target = root / step_dir_name(step)
    if not target.is_dir():
        _write_directory(target, lambda tmp: _write_files(tmp, model, trainer_state,
                                                          {**info, "step": step}))
    atomic_write_json(root / LATEST_FILE, {"checkpoint": target.name, "step": step,
                                           "final": final, "format": FORMAT_VERSION,
                                           "saved_unix": int(time.time())})
    _prune(root, max(1, keep))
    log.info("saved %scheckpoint %s", "final " if final else "", target)
    return CheckpointInfo(target, step, final)


def _write_files(folder: Path, model: nn.Module, trainer_state: dict[str, Any],
                 info: dict[str, Any]) -> None:
    from safetensors.torch import save_model

    try:
        save_model(model, str(folder / MODEL_FILE))
    except Exception as err:  # safetensors' own error type for a failed write
        cause = as_os_error(err, folder / MODEL_FILE)
        if cause is err:
            raise
        raise cause from err
    save_torch(trainer_state, folder / TRAINER_FILE)
    (folder / STATE_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **info}, indent=2)
                                     + "\n", encoding="utf-8")


def _write_directory(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a fresh temporary folder beside ``target``; it is fsynced and renamed to ``target``
    (a crash leaves a ``.tmp`` folder that :func:`remove_orphans` deletes)."""
    with atomic_directory(target) as tmp:
        fill(tmp)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint folder, oldest first."""
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    latest = latest_checkpoint(root)
    for step, path in _step_dirs(root)[:-keep]:
        if latest is None or path != latest.path:
            shutil.rmtree(path, ignore_errors=True)
            log.debug("removed old checkpoint %s (step %d)", path, step)


def latest_checkpoint(root: str | os.PathLike) -> CheckpointInfo | None:
    """The checkpoint ``latest.json`` names, or ``None`` when there is none yet."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    data = json.loads(pointer.read_text(encoding="utf-8"))
    path = root / data["checkpoint"]
    if not path.is_dir():
        raise RunError(f"{pointer} names {path}, which is missing; the checkpoint folder "
                       "was modified by hand. Restore it or start a new run.")
    return CheckpointInfo(path, int(data["step"]), bool(data["final"]))


def remove_orphans(root: str | os.PathLike) -> list[Path]:
    """Remove temporary folders and checkpoints newer than ``latest.json``'s; returns them."""
    root = Path(root)
    if not root.is_dir():
        return []
    latest = latest_checkpoint(root)
    limit = latest.step if latest is not None else -1
    doomed = [p for p in root.iterdir() if p.is_dir() and p.name.endswith(".tmp")]
    doomed += [p for step, p in _step_dirs(root) if step > limit]
    for path in doomed:
        log.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load_checkpoint(info: CheckpointInfo, model: nn.Module, device: torch.device | str = "cpu",
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the weights into ``model`` (strictly) and return ``(state.json, trainer.pt)``.

    Tensors in ``trainer.pt`` are mapped to ``device`` (the optimizer moves its state next to
    the parameters anyway); RNG states stay on the CPU.
    """
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(info.path / MODEL_FILE), strict=False,
                                     device=str(device))
    if missing or unexpected:
        raise RunError(f"checkpoint {info.path} does not match the model: missing "
                       f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; resume "
                       "with the same model settings as the run that wrote it")
    trainer = torch.load(info.path / TRAINER_FILE, map_location="cpu", weights_only=True)
    state = json.loads((info.path / STATE_FILE).read_text(encoding="utf-8"))
    return state, trainer
