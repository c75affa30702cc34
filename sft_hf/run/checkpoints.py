"""Crash-safe checkpoints: resume only from a checkpoint every process finished writing.

transformers writes `checkpoint-N/` in place, file by file and process by process, and `get_last_checkpoint` returns
the highest N whatever its state: a run killed during a save would resume from a half-written folder. It also rotates
old checkpoints out (`save_total_limit`) at the end of its own save, before anything could mark the new one complete.
`CrashSafeCheckpoints` (a callback InstructionTrainer adds, taking `save_total_limit` over from Trainer) therefore
removes the marker of a folder about to be written again, marks the folder complete once all processes are done with
it, and only then rotates (`rotate_checkpoints`, which never deletes the newest complete checkpoint);
`resolve_resume_checkpoint` resumes from the newest checkpoint that has the marker.

Each checkpoint also holds the run's recipe.yaml. Trainer resumes the optimizer and scheduler state whatever the new
arguments say: a resume with another learning rate keeps the old one in the optimizer but the new schedule, a longer
max_steps re-stretches the decay mid-run. `check_resume_recipe` refuses such a mix before any work.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import yaml
from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft_hf.errors import RecipeError
from sft_hf.run.parser import save_recipe
from sft_hf.run.safety import MARKER_FILES

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
RECIPE_FILE = "recipe.yaml"
# Recipe keys a resumed run may change: they decide what is logged, evaluated, saved or where, not which updates
# the model gets (nor the order of its batches). Every other change is refused at resume.
RESUME_MAY_CHANGE = frozenset({
    "resume_from_checkpoint", "output_dir", "overwrite_output_dir", "logging_steps", "logging_strategy",
    "logging_first_step", "logging_dir", "log_level", "report_to", "run_name", "disable_tqdm", "save_strategy",
    "save_steps", "save_total_limit", "eval_strategy", "eval_steps", "per_device_eval_batch_size", "max_eval_samples",
    "eval_exact_match", "baseline_exact_match", "max_new_tokens", "generation_batch_size", "eval_generation_samples",
    "num_sample_generations", "push_to_hub", "hub_model_id", "hub_private_repo", "cpu_threads",
    "dataloader_num_workers", "dataset_num_proc", "onednn_linear", "ddp_timeout", "dead_rank_timeout",
})
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def mark_complete(checkpoint: str | Path, step: int) -> None:
    """Written to a temp name and renamed, so the marker itself is never partial."""
    tmp = Path(checkpoint, f".{COMPLETE_MARKER}.tmp")
    tmp.write_text(f"{step}\n")
    os.replace(tmp, Path(checkpoint, COMPLETE_MARKER))


def unmark(checkpoint: str | Path) -> None:
    """Before a folder is written again (a run resumed from an older checkpoint re-saves `checkpoint-N`): a crash
    during that save must not leave old and new files behind a marker that says complete."""
    Path(checkpoint, COMPLETE_MARKER).unlink(missing_ok=True)


def rotate_checkpoints(output_dir: str | Path, save_total_limit: int | None, keep=()) -> list[Path]:
    """Deletes checkpoints beyond `save_total_limit`, half-written leftovers first, then the oldest complete ones;
    never the newest complete checkpoint nor those in `keep` (the one just written, the best one). Returns them."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = checkpoints_by_step(output_dir)  # newest first
    complete = [c for c in checkpoints if is_complete(c)]
    protected = {Path(k).resolve() for k in keep if k} | {c.resolve() for c in complete[:1]}
    excess = len(checkpoints) - max(save_total_limit, len(protected & {c.resolve() for c in checkpoints}))
    deleted = []
    for checkpoint in [c for c in reversed(checkpoints) if not is_complete(c)] + complete[::-1]:
        if len(deleted) >= excess:
            break
        if checkpoint.resolve() not in protected:
            logger.info("deleting %s (save_total_limit=%d)", checkpoint, save_total_limit)
            shutil.rmtree(checkpoint, ignore_errors=True)
            deleted.append(checkpoint)
    return deleted


class CrashSafeCheckpoints(TrainerCallback):
    """Trainer's checkpoints, crash-safe: a folder about to be written again loses its completion marker first; once
    every process has written its part, the folder gets the run's recipe.yaml (which a resume compares) and its
    marker, and only then are old checkpoints rotated out, down to `save_total_limit`."""

    def __init__(self, save_total_limit: int | None = None, recipe: dict | None = None):
        self.save_total_limit, self.recipe = save_total_limit, recipe

    def on_step_end(self, args, state, control, **kwargs):
        # should_save is known now, except for save_strategy "best", decided after the evaluation
        if control.should_save or (args.save_strategy == "best" and control.should_evaluate):
            if args.should_save:
                unmark(Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
            PartialState().wait_for_everyone()  # no process writes into the folder while it still looks complete

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()  # other processes may still be writing their optimizer / RNG shards
        folder = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and folder.is_dir():
            if self.recipe is not None:
                save_recipe(self.recipe, folder / RECIPE_FILE)
            mark_complete(folder, state.global_step)
            rotate_checkpoints(folder.parent, self.save_total_limit, keep=[folder, state.best_model_checkpoint])


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


def check_resume_recipe(checkpoint: str | Path, recipe: dict) -> None:
    """Refuses to resume `checkpoint` with training values other than those it was trained with (its recipe.yaml;
    a key missing from either side has its default value). Checkpoints without a recipe.yaml are not checked."""
    saved_file = Path(checkpoint, RECIPE_FILE)
    if not saved_file.is_file():
        logger.warning("%s has no %s: cannot check that this run's recipe matches the one it was trained with",
                       checkpoint, RECIPE_FILE)
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    changed = [key for key in dict.fromkeys([*saved, *recipe])
               if key not in RESUME_MAY_CHANGE and saved.get(key) != recipe.get(key)]
    if not changed:
        return

    def shown(values, key):
        return repr(values[key]) if key in values else "default"

    differences = ", ".join(f"{key} {shown(saved, key)} → {shown(recipe, key)}" for key in changed)
    raise RecipeError(
        f"resume_from_checkpoint: {checkpoint} was trained with other values ({differences}); resuming would mix "
        f"the two (the optimizer and scheduler state are the checkpoint's). Resume it as it was trained (--config "
        f"{saved_file} --resume_from_checkpoint {checkpoint}), or fine-tune its weights in a new run "
        f"(--model_name_or_path {checkpoint} --output_dir <a new folder>)")


def resume_hint(output_dir: str | Path, none_saved: str) -> str:
    """Where a stopped run goes on from: its newest complete checkpoint, or `none_saved` when it has none."""
    checkpoint = latest_complete_checkpoint(output_dir)
    if checkpoint is None:
        return none_saved
    return (f"{checkpoint} is the newest complete checkpoint: run the same command with --resume_from_checkpoint "
            "true to go on from it")


def interrupted_training_message(output_dir: str | Path, state) -> str:
    """What Ctrl-C during training leaves, and how to go on from it (`state`: Trainer's TrainerState)."""
    return (f"interrupted at step {state.global_step} of {state.max_steps}; " + resume_hint(
        output_dir, "no checkpoint was saved (save_strategy: steps keeps them), so nothing of this run is kept"))


def resumes_latest(resume_from_checkpoint) -> bool:
    """`resume_from_checkpoint` asks for the newest complete checkpoint ("true", "yes", "latest")."""
    return resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "yes", "latest")


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint` → the folder to give `Trainer.train`.

    None / "false" → start fresh; "true" / "latest" → the newest complete checkpoint in `output_dir` (start fresh,
    with a warning, when there is none: the same command can then start and restart a preemptible job);
    a path → that checkpoint (it must exist; a warning when it is not marked complete).
    """
    if value is None or value is False or str(value).lower() in ("", "false", "no", "none"):
        return None
    if resumes_latest(value):
        checkpoint = latest_complete_checkpoint(output_dir)
        finished = [n for n in MARKER_FILES if Path(output_dir, n).is_file()]
        if checkpoint is None and finished:  # starting from scratch would replace a finished model
            raise RecipeError(f"resume_from_checkpoint={value}: {output_dir} holds a finished model ({finished[0]}) and "
                              "no checkpoint to resume from; to train again from scratch, pass --overwrite_output_dir "
                              "true or another --output_dir")
        if checkpoint is None:
            logger.warning("resume_from_checkpoint=%s: no complete checkpoint in %s, starting from scratch",
                           value, output_dir)
        else:
            logger.info("resuming from %s", checkpoint)
        return checkpoint
    if not Path(value).is_dir():
        raise RecipeError(f"resume_from_checkpoint: {value} is not a checkpoint folder")
    if not is_complete(value):
        logger.warning("%s has no %s marker: it may be half-written (or written by another tool)", value,
                       COMPLETE_MARKER)
    return str(value)
