"""Faults and safety: an atomic final save, a stop on non-finite loss or on fp16 overflow at every step, a policy for
non-empty output dirs. (How an error reaches the user, secrets redacted, is sft_hf/errors.py.)
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from sft_hf.errors import NonFiniteLossError, RecipeError

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Atomic save


# What `from_pretrained` (model or PEFT adapter) reads first: removed first and moved in last, so a directory without
# them, which is all an interrupted swap can leave, never loads as a model.
MARKER_FILES = ("config.json", "adapter_config.json")
WEIGHT_FILE = re.compile(
    r"^(model|adapter_model|pytorch_model|tf_model)([-.].*)?\.(safetensors|bin|h5)(\.index\.json)?$")


def staging_dir(output_dir: str | os.PathLike) -> Path:
    """Beside output_dir (same filesystem, so renames are atomic) and hidden; the same name on every process."""
    final = Path(output_dir).resolve()
    return final.parent / f".{final.name}.saving"


@contextmanager
def atomic_save(output_dir: str | os.PathLike, enabled: bool = True):
    """Yields a staging folder to save into; when the block finishes, its content replaces output_dir's.

    If the block raises or the process dies, output_dir is untouched (a leftover staging folder is hidden and
    removed by the next save). `enabled=False` (processes other than the main one) yields the same path, no I/O.
    """
    staging = staging_dir(output_dir)
    if not enabled:
        yield str(staging)
        return
    shutil.rmtree(staging, ignore_errors=True)  # an earlier save that was interrupted: never published
    staging.mkdir(parents=True)
    try:
        yield str(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, Path(output_dir))


def publish(staging: Path, final: Path) -> None:
    if not final.exists():
        os.rename(staging, final)  # one atomic step: the folder appears complete or not at all
        return
    # output_dir already holds checkpoints or files of this run: move the new files in one by one, config last.
    new_names = {p.name for p in staging.iterdir()}
    for path in final.iterdir():  # the old model's marker and weight files would mix with the new ones
        old_model_file = path.name in MARKER_FILES or WEIGHT_FILE.match(path.name)
        if path.is_file() and path.name not in new_names and old_model_file:
            path.unlink()
    for name in MARKER_FILES:
        (final / name).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda p: p.name in MARKER_FILES):
        target = final / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss


def first_non_finite(model, grads: bool) -> str | None:
    # Under ZeRO-3 a parameter is an empty placeholder; this process's slice of it is `ds_tensor`.
    named = [(name, param.grad if grads else getattr(param, "ds_tensor", param))
             for name, param in model.named_parameters()]
    tensors = [t for _, t in named if t is not None]
    # One fused norm per tensor and a single host sync: a NaN/inf anywhere makes its norm non-finite.
    if not tensors or bool(torch.stack([n.float().to(tensors[0].device) for n in torch._foreach_norm(tensors)]).isfinite().all()):
        return None
    for name, tensor in named:  # rare path: name the culprit
        if tensor is not None and not torch.isfinite(tensor).all():
            return name + (".grad" if grads else "")
    return None


def last_checkpoint(args) -> str | None:
    """The newest checkpoint in the run's output_dir, for a message that stops training."""
    return get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None


def agreed_max(value: int, device) -> int:
    """The largest of the processes' `value`s, on every process (one all-reduce when several processes run)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def agreed_any(flag: bool, device) -> bool:
    """True on every process if `flag` is true on any."""
    return bool(agreed_max(int(flag), device))


def agreed_non_finite(bad: str | None, device) -> str | None:
    """Every process stops, or none: under FSDP / ZeRO each process checks only its shard, and one process raising
    alone would leave the others waiting in the next collective. One all-reduced flag per check."""
    anywhere = agreed_any(bad is not None, device)  # every process all-reduces, whatever it found
    return bad or ("a tensor on another process" if anywhere else None)


def uses_deepspeed(args) -> bool:
    return bool(getattr(args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops training at the first NaN/inf gradient, before `optimizer.step()` applies it.

    Raising here means the update is never applied, no checkpoint is written for that step, and the final save never
    runs: the weights in memory and the last checkpoint on disk stay the last good ones. (Trainer's
    `logging_nan_inf_filter` hides NaN losses from the logs, so the gradients are what is checked.) With fp16 loss
    scaling, inf gradients are normal (the scaler skips the step), and under DeepSpeed the gradients are not visible
    before the update (accelerate steps the engine inside `backward`): then the weights are checked after the step,
    still before any checkpoint of it is written. All processes agree on one flag, so they stop together.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and not self._checks_after_update(args):
            # an optimizer that already took the gradients' norm this step (speed/master_weights.py): a NaN/inf
            # anywhere makes it non-finite, so only then is every gradient looked at, to name the culprit
            norm = getattr(getattr(optimizer, "optimizer", optimizer), "last_grad_norm", None)
            finite = norm is not None and bool(torch.isfinite(norm))
            bad = agreed_non_finite(None if finite else first_non_finite(model, grads=True), args.device)
            if bad:
                raise NonFiniteLossError(self._message(args, state, f"the gradient {bad}", "before the update"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self._checks_after_update(args):
            bad = agreed_non_finite(first_non_finite(model, grads=False), args.device)
            if bad:
                raise NonFiniteLossError(self._message(args, state, f"the weight {bad}", "after the update"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss") + (() if args.fp16 else ("grad_norm",)):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteLossError(self._message(args, state, f"{key}={value}", "when logging"))

    @staticmethod
    def _checks_after_update(args) -> bool:
        return bool(args.fp16) or uses_deepspeed(args)

    @staticmethod
    def _message(args, state, what: str, when: str) -> str:
        last = last_checkpoint(args)
        return (
            f"non-finite loss at step {state.global_step + 1}: {what} is NaN/inf ({when}). Training stopped and "
            f"nothing was saved for this step; last good checkpoint: {last or 'none saved yet'}. "
            "Try a lower learning_rate, max_grad_norm > 0, fp32 instead of fp16, or check the data."
        )


# fp16's loss scaler starts at 2^16 and halves at each skipped step: after 32 skips in a row it is 2^-16, so the
# gradients overflow even scaled far below 1, i.e. the forward pass itself overflows fp16 and no scale will help.
# A legitimate burst (the first steps finding the scale, a loss spike) takes a few skips.
MAX_SKIPPED_STEPS = 32


def loss_scale(optimizer) -> float | None:
    """The current scale of torch's GradScaler, which accelerate hands its optimizer wrapper under fp16 (None under
    DeepSpeed, which scales the loss itself, and without fp16)."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None


class StopOnSkippedSteps(TrainerCallback):
    """Stops an fp16 run whose loss scaler skipped `limit` optimizer steps in a row (MAX_SKIPPED_STEPS), with one line
    saying why: each skip leaves the weights unchanged, Trainer's log hides the inf loss (it can read 0.0) and the
    non-finite guard accepts inf gradients under fp16, so such a run would otherwise finish having learned nothing.

    A skip is seen as the GradScaler's scale going down across the step (it only lowers it on inf/NaN gradients).
    accelerate's own `step_was_skipped` cannot tell: it watches whether the optimizer's `step` ran, and fused AdamW
    (Trainer's default) runs it and skips inside. Under DeepSpeed its `step_was_skipped` reads the engine's overflow.
    Every process counts the same skips (one all-reduced flag per step), so they stop together."""

    def __init__(self, limit: int = MAX_SKIPPED_STEPS):
        self.limit = limit
        self.skipped = 0
        self.scale_before = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.scale_before = loss_scale(optimizer) if args.fp16 else None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if not args.fp16 or optimizer is None:
            return
        scale = loss_scale(optimizer)
        if scale is not None and self.scale_before is not None:
            skipped = scale < self.scale_before
        else:
            skipped = bool(getattr(optimizer, "step_was_skipped", False))
        if not agreed_any(skipped, args.device):
            self.skipped = 0
            return
        self.skipped += 1
        if self.skipped >= self.limit:
            first = state.global_step - self.skipped + 1
            last = last_checkpoint(args)
            raise NonFiniteLossError(
                f"fp16 overflow: the loss scaler skipped {self.skipped} optimizer steps in a row (steps {first}-"
                f"{state.global_step}{f', loss scale now {scale:g}' if scale is not None else ''}): the gradients "
                f"are inf/NaN at every scale, so the weights have not changed since step {first - 1}. Training "
                f"stopped; last good checkpoint: {last or 'none saved yet'}. Use precision bf16 (Ampere or newer "
                "GPUs) or fp32, a lower learning_rate, or check the data."
            )


# ---------------------------------------------------------------------------------------------------------------
# Output dir policy


RUN_LOGS = ("eval_generations.jsonl", "test_responses.json")
# What a finished run writes beside its model: removed when a new model replaces it, so that an evaluation
# interrupted after that never leaves the old run's card and metrics describing the new model.
RUN_RESULTS = ("README.md", "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json",
               "loss_curve.png")
DATA_LOOKS = ("inspect.html", "data_report")  # sft-hf inspect / report's default outputs


def check_output_dir(args, is_main: bool = True) -> None:
    """A second run into a non-empty output_dir must say what to do instead of overwriting or crashing later.

    Resuming (`resume_from_checkpoint` true or a path, resolved by sft_hf.run.checkpoints) and `overwrite_output_dir`
    are the two ways in. With overwrite, the old run's checkpoints and RUN_LOGS are removed now (they would mix with
    this run's, and checkpoints be resumed from) and its final model stays until the new one replaces it atomically.
    """
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir {out} is a file, not a folder")
    # `sft-hf inspect` / `report` write into output_dir by default: looking at the data first is not a run
    contents = sorted(p.name for p in out.iterdir() if p.name not in DATA_LOOKS) if out.is_dir() else []
    resume = args.resume_from_checkpoint
    if not contents or (resume not in (None, False) and str(resume).lower() not in ("", "false", "no", "none")):
        return
    shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
    if not args.overwrite_output_dir:
        raise RecipeError(
            f"output_dir {out} is not empty ({shown}): pass --overwrite_output_dir true to replace that run, "
            "--resume_from_checkpoint true to continue it from its last checkpoint, or choose another --output_dir"
        )
    stale = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    # Logs this run appends to or may not write (no exact match asked for): left, they would mix two runs.
    stale_logs = [out / name for name in RUN_LOGS if (out / name).is_file()]
    logger.warning(f"overwrite_output_dir: replacing the run in {out} ({shown}); removing {len(stale)} old checkpoints"
                   + "".join(f", {p.name}" for p in stale_logs))
    if is_main:
        for path in stale:
            shutil.rmtree(path)
        for path in stale_logs:
            path.unlink()
