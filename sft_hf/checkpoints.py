"""Crash-safe checkpoints: resume only from a checkpoint every process finished writing.

transformers (5.x) writes `checkpoint-N/` in place, file by file and process by process, and
`get_last_checkpoint` returns the highest N whatever its state: a run killed during a save would resume from a
half-written folder. `CheckpointCompleteCallback` writes a marker file once all processes are done with a
checkpoint, and `resolve_resume_checkpoint` resumes from the newest checkpoint that has it.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointCompleteCallback(TrainerCallback):
    """`on_save` runs on every process right after Trainer wrote the checkpoint; once all processes are there,
    the main one marks it complete (written to a temp name and renamed, so the marker itself is never partial)."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # other ranks may still be writing their optimizer / RNG shards
        folder = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and folder.is_dir():
            tmp = folder / f".{COMPLETE_MARKER}.tmp"
            tmp.write_text(f"{state.global_step}\n")
            os.replace(tmp, folder / COMPLETE_MARKER)
        return control


def is_complete(checkpoint: str | Path) -> bool:
    return Path(checkpoint, COMPLETE_MARKER).is_file()


def checkpoints_by_step(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders in `output_dir`, newest (highest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    for checkpoint in checkpoints_by_step(output_dir):
        if is_complete(checkpoint):
            return str(checkpoint)
        logger.warning("ignoring %s: it was not finished (no %s; the run probably died while saving it)",
                       checkpoint, COMPLETE_MARKER)
    return None


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint` → the folder to give `Trainer.train`.

    None / "false" → start fresh; "true" / "latest" → the newest complete checkpoint in `output_dir` (start fresh,
    with a warning, when there is none: the same command can then start and restart a preemptible job);
    a path → that checkpoint (it must exist; a warning when it is not marked complete).
    """
    if value is None or value is False or str(value).lower() in ("", "false", "no", "none"):
        return None
    if value is True or str(value).lower() in ("true", "yes", "latest"):
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            logger.warning("resume_from_checkpoint=%s: no complete checkpoint in %s, starting from scratch",
                           value, output_dir)
        else:
            logger.info("resuming from %s", checkpoint)
        return checkpoint
    if not Path(value).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} is not a checkpoint folder")
    if not is_complete(value):
        logger.warning("%s has no %s marker: it may be half-written (or written by another tool)", value,
                       COMPLETE_MARKER)
    return str(value)
