"""`InstructionTrainer`: `transformers.Trainer` plus the bookkeeping instruction tuning needs.

The loss itself is Trainer's: since transformers 4.46 it passes `num_items_in_batch` (trained tokens over all
gradient-accumulation micro-batches, counted after the causal shift, summed over processes when
`average_tokens_across_devices`) to the model's loss, so the loss is a mean over trained tokens, not a mean of
per-batch means. `tests/test_trainer.py` checks that equality holds; this class adds what Trainer lacks:
trained tokens per second (of training time only) and the padding fraction in the logs, crash-safe checkpoints
(sft_hf/run/checkpoints.py), the run's precision plan (sft_hf/precision.py) and a collator by default.

Three of Trainer's private methods are overridden, for want of a public hook: `_clip_grad_norm` and `_get_grad_norm`
(with bf16 weights and fp32 masters the optimizer clips as it updates, instead of the extra passes over every gradient
Trainer's clipping takes) and `_issue_warnings_after_load` (a tied output head is not missing from a checkpoint).
`tests/test_trainer.py` fails loudly when one disappears or changes its signature.
"""
from __future__ import annotations

import inspect
import logging
import time

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from sft_hf.collator import (IGNORE_INDEX, SOURCE_COUNTS, STREAM_POSITION, InstructionDataCollator,
                             has_varlen_attention, resolve_pad_token_id)
from sft_hf.precision import settle_precision
from sft_hf.run.checkpoints import CrashSafeCheckpoints
from sft_hf.speed import master_weights
from sft_hf.speed.linear_cross_entropy import fused_head, linear_cross_entropy

logger = logging.getLogger(__name__)


def resolve_sampling_strategy(args, collator) -> str:
    """`auto`: random order for padding-free rows (grouping would save nothing there, and batches of similar
    lengths train a little differently: docs/speed.md), length-grouped for padded batches."""
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy != "auto":
        return strategy
    return "random" if getattr(collator, "padding_free", False) else "group_by_length"


def describe_batching(args, collator, model) -> str:
    sampling = resolve_sampling_strategy(args, collator)
    if getattr(collator, "padding_free", False):
        text = f"padding-free rows (examples concatenated per batch, {sampling} order)"
        if not has_varlen_attention(model):
            text += ("; WARNING: without a variable-length attention (sdpa_varlen, flash-attention) every token "
                     "attends over the whole row, which is slower than length-grouped padded batches")
        else:
            text += f", attention per example ({model.config._attn_implementation})"
        return text
    if sampling in ("group_by_length", "batch_rebalance"):
        return f"padded batches of similar lengths (train_sampling_strategy={sampling}: little padding)"
    return f"padded batches in {sampling} order (train_sampling_strategy=group_by_length would cut the padding)"


def sparse_tied_embedding_gradient(model) -> bool:
    """Where the input embedding is the output projection's weight (SmolLM2, Qwen2.5-0.5B), its lookup hands
    autograd a sparse gradient (the rows of the step's tokens) instead of a dense one: the engine then adds those
    rows into the projection's dense gradient instead of zero-filling and adding a second vocabulary-sized tensor
    (a measurable share of a SmolLM2 step on a CPU). The summed gradient stays dense, so the optimizer sees no change."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(embedding) is not torch.nn.Embedding or head is None or embedding.weight is not head.weight:
        return False
    embedding.sparse = embedding.weight.requires_grad
    return embedding.sparse


def accepts_logits_mask(model) -> bool:
    """The model (or the one PEFT wraps) takes `logits_to_keep`, which transformers' causal LMs read through
    `slice_logits_to_keep`: a boolean (batch, tokens) mask keeps those positions only. (A model that read it
    otherwise would fail loudly: its logits would not match the targets' count.)"""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(type(base), "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


class StepClock(TrainerCallback):
    """Ends a step's training time at on_step_end, before the logging, evaluation and saving that follow the step
    (InstructionTrainer.get_batch_samples starts it when the step's batches are fetched)."""

    def __init__(self, trainer: "InstructionTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer._step_started is not None:
            trainer._training_seconds += time.perf_counter() - trainer._step_started
            trainer._step_started = None


class InstructionTrainer(Trainer):
    def __init__(self, *args, completion_only_loss: bool = False, recipe: dict | None = None, **kwargs):
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        model = kwargs.get("model", args[0] if args else None)
        if train_args is not None and model is not None:  # before the Accelerator is set up with mixed precision
            settle_precision(train_args, model)
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = InstructionDataCollator(
                pad_token_id=resolve_pad_token_id(kwargs["processing_class"]),
                completion_only_loss=completion_only_loss,
            )
        super().__init__(*args, **kwargs)
        # saved in every checkpoint: a resume with other values is refused (checkpoints.py)
        self.checkpoints = CrashSafeCheckpoints(recipe=recipe)
        self.add_callback(self.checkpoints)
        self.add_callback(StepClock(self))
        if (plan := getattr(self.args, "precision_plan", None)) is not None:
            logger.info("Precision: %s", plan.describe())
        self.args.train_sampling_strategy = resolve_sampling_strategy(self.args, self.data_collator)  # `auto` decided
        logger.info("Batching: %s", describe_batching(self.args, self.data_collator, self.model))
        if getattr(self.args, "onednn_linear", False) and self.args.device.type == "cpu" and not self.args.torch_compile:
            from sft_hf.speed.onednn_linear import onednn_pays, use_onednn_linear

            if onednn_pays() and (swapped := use_onednn_linear(self.model)):
                logger.info("Matmuls: %d fp32 linear layers on oneDNN (MKL takes its AVX2 path on this CPU)", swapped)
        self.logits_where_trained = getattr(self.args, "logits_where_trained", False) and accepts_logits_mask(self.model)
        # the output projection and cross-entropy fused over vocabulary chunks (speed/linear_cross_entropy.py): CPU,
        # one process (the model's forward is asked for hidden states, which DDP's wrapper must not see differ), no
        # autocast (it would run the chunks' GEMMs in whatever precision it picks for them), a model whose loss
        # takes num_items_in_batch (else Trainer divides by the accumulation steps again)
        self.fuse_head = (self.logits_where_trained and getattr(self.args, "fused_cross_entropy", False)
                          and self.args.device.type == "cpu" and self.args.world_size == 1
                          and not (self.args.bf16 or self.args.fp16) and self.model_accepts_loss_kwargs)
        self._fused_head = None  # the head module, once the first batch has shown the model's logits allow it
        if self.args.device.type == "cpu" and self.args.world_size == 1:
            sparse_tied_embedding_gradient(self.model)
        # trained tokens, padding positions, all positions since the last log; summed over processes when logged
        self._token_counts = torch.zeros(3, dtype=torch.long)
        self._step_started: float | None = None  # when the current step's batches were fetched (StepClock ends it)
        self._training_seconds = 0.0  # training time since the last log: no logging, evaluation or saving
        self.trained_tokens_total = 0
        # What the batches trained so far say about the data (sft_hf/streaming.py's DataStateCallback saves it):
        # examples and trained tokens per mixture source, and the last streamed row trained on.
        self.source_counts: torch.Tensor | None = None
        self.stream_position: torch.Tensor | None = None

    # bf16 weights with fp32 master copies (speed/master_weights.py): the optimizer holds the fp32 truth, clips as it
    # reads the gradients, and gives the masters back to the model when training ends.
    def create_optimizer(self, model=None):
        plan = getattr(self.args, "precision_plan", None)
        if self.optimizer is not None or not (plan and plan.master_weights):
            return super().create_optimizer(model)
        cast = master_weights.cast_to_bf16_keeping_masters(self.model)
        decay = set(self.get_decay_parameter_names(self.model))
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        self.optimizer = master_weights.MasterWeightAdamW(
            groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon)
        logger.info("Precision: bf16 weights (%d tensors), fp32 master weights and AdamW state in the optimizer", cast)
        return self.optimizer

    def _master_optimizer(self):
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        return optimizer if isinstance(optimizer, master_weights.MasterWeightAdamW) else None

    def _clip_grad_norm(self, model):
        # private: the fp32-master optimizer clips as it updates (one pass), where Trainer clips the bf16 gradients
        if (optimizer := self._master_optimizer()) is not None:
            return optimizer.clip_grad_norm_(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        # private: Trainer takes the norm in a pass of its own even without clipping; the optimizer has it already
        if grad_norm is None and (optimizer := self._master_optimizer()) is not None:
            grad_norm = optimizer.clip_grad_norm_(float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def train(self, *args, **kwargs):
        # Trainer would rotate old checkpoints out before the new one is marked complete: CrashSafeCheckpoints does it
        # after, so it takes save_total_limit over for the run
        self.checkpoints.save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            return super().train(*args, **kwargs)
        finally:  # also after Ctrl-C: what is saved or evaluated next is the fp32 model
            self.args.save_total_limit = self.checkpoints.save_total_limit
            if (optimizer := self._master_optimizer()) is not None:
                master_weights.restore_master_weights(self.model, optimizer)
                self.optimizer = None  # a later train() casts the weights again and starts a new optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Training needs logits only where a token is trained: prompts (completion_only_loss), the last token of each
        # example and padding have no target, yet the stock forward projects them onto the whole vocabulary
        # (49,152 for SmolLM2: a fifth of its FLOPs) and through the cross-entropy. The model's own `logits_to_keep`
        # takes a boolean mask; `shift_labels` are the targets of exactly those positions, so the loss is the same
        # sum over trained tokens ÷ `num_items_in_batch`, and its gradient too (tests/test_trainer.py).
        if (self.logits_where_trained and model.training and "labels" in inputs and self.label_smoother is None
                and self.compute_loss_func is None):
            targets = F.pad(inputs["labels"][..., 1:], (0, 1), value=IGNORE_INDEX)
            keep = targets != IGNORE_INDEX
            if not return_outputs and self._uses_fused_head(model, inputs):  # who asks for outputs wants logits
                return self._fused_loss(model, inputs, keep, targets[keep], num_items_in_batch)
            inputs = {**inputs, "logits_to_keep": keep, "shift_labels": targets[keep]}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _uses_fused_head(self, model, inputs) -> bool:
        if self.fuse_head and self._fused_head is None:  # the first batch: the logits must be lm_head(hidden)
            self._fused_head = fused_head(self.accelerator.unwrap_model(model), inputs)
            self.fuse_head = self._fused_head is not None
            logger.info("Output projection + cross-entropy: %s", "fused over vocabulary chunks" if self.fuse_head
                        else "the model's own (its logits are not lm_head(final hidden state))")
        return self.fuse_head

    def _fused_loss(self, model, inputs, keep, targets, num_items_in_batch):
        """Trainer's loss (sum over trained tokens / num_items_in_batch), the head and cross-entropy fused."""
        features = {k: v for k, v in inputs.items() if k != "labels"}
        with self._fused_head.returning_hidden_states():
            outputs = model(**features, logits_to_keep=keep)
        hidden = outputs.logits.reshape(-1, self._fused_head.in_features)  # the kept positions' final states
        return linear_cross_entropy(hidden, self._fused_head.weight, targets, num_items_in_batch)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Trainer checks max_steps only after a step: a run resumed from a checkpoint saved at max_steps (interrupted
        # in its final evaluation or save) would train a step past its schedule. No batches: Trainer ends the epoch.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return [], None
        self._step_started = time.perf_counter()  # a step's training time starts with fetching its batches
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if (counts := inputs.pop(SOURCE_COUNTS, None)) is not None:  # bookkeeping, not a model input
            self.source_counts = counts if self.source_counts is None else self.source_counts + counts
        if (position := inputs.pop(STREAM_POSITION, None)) is not None:
            self.stream_position = position
        labels = inputs.get("labels")
        if labels is not None:
            # Counted on the batch's device and read only when logging: no host sync per step.
            trained = (labels[..., 1:] != IGNORE_INDEX).sum()  # targets after the model's internal shift
            mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
            if mask is not None:
                padding = (mask == 0).sum()
            elif positions is not None:  # a padding-free row: its filler is a last segment that trains nothing
                last = positions.eq(0).cumsum(-1) == positions.eq(0).sum(-1, keepdim=True)
                padding = last.sum() * torch.where(last, labels == IGNORE_INDEX, True).all()
            else:
                padding = torch.zeros_like(trained)
            if self._token_counts.device != labels.device:
                self._token_counts = self._token_counts.to(labels.device)
            self._token_counts += torch.stack([trained, padding, torch.full_like(trained, labels.numel())])
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A training log, or the end-of-training summary (which flushes the steps after the last training log);
        # every process is here for both, so the counts can be summed over processes.
        is_train_log, is_end = "loss" in logs, "train_runtime" in logs
        if is_train_log or is_end:
            counts = self._token_counts.to(self.args.device)
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            trained, padding, positions = counts.tolist()
            if is_train_log:
                logs["train_tokens_per_second"] = round(trained / max(self._training_seconds, 1e-9), 1)
                logs["padding_fraction"] = round(padding / max(positions, 1), 4)
            self.trained_tokens_total += int(trained)
            self._token_counts.zero_()
            self._training_seconds = 0.0
        super().log(logs, start_time)

    def _issue_warnings_after_load(self, load_result) -> None:
        # private: a tied output head (SmolLM2's lm_head.weight is embed_tokens.weight) is saved once, and Trainer
        # warns at every resume that it is missing, although loading the embedding loaded it
        params = dict(self.model.named_parameters(remove_duplicate=False))
        loaded = {p.data_ptr() for name, p in params.items() if name not in load_result.missing_keys}
        missing = [k for k in load_result.missing_keys if k not in params or params[k].data_ptr() not in loaded]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))
