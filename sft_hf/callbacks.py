"""Training callbacks that show what the model writes: at each evaluation it greedily answers a few held-out
prompts and logs them (and their exact match, when the dataset's answers are checkable by string equality); and the
held-out exact match before the first update. Under `accelerate launch` every process generates its share: with
FSDP or ZeRO-3 each forward pass needs all of them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from sft_hf.evaluation.generation import generate_responses, request_text
from sft_hf.evaluation.metrics import exact_match
from sft_hf.templates import reference_answer

logger = logging.getLogger(__name__)


class GenerationSamplesCallback(TrainerCallback):
    """Adds `eval_samples_exact_match` to the evaluation metrics (when `check_answers`) and appends every sample to
    `<output_dir>/eval_generations.jsonl` as {step, instruction, input, expected, response}."""

    def __init__(self, records: list[dict], template="alpaca", max_new_tokens: int = 64, check_answers: bool = False,
                 batch_size: int | None = None, tokenizer=None):
        self.records, self.template, self.max_new_tokens = list(records), template, max_new_tokens
        self.check_answers, self.batch_size, self.tokenizer = check_answers, batch_size, tokenizer
        self.history: list[dict] = []  # what was generated at each evaluation, for tests and notebooks

    def on_evaluate(self, args, state, control, model=None, processing_class=None, metrics=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        if not self.records or model is None or tokenizer is None:
            return
        responses = generate_responses(model, tokenizer, self.records, self.template, self.max_new_tokens,
                                       batch_size=self.batch_size, show_progress=False,
                                       distributed=args.world_size > 1)
        samples = [{"step": state.global_step, "instruction": r.get("instruction"), "input": r.get("input"),
                    "expected": reference_answer(r), "response": resp} for r, resp in zip(self.records, responses)]
        self.history.append({"step": state.global_step, "samples": samples})
        score = None
        if self.check_answers:
            score = exact_match(responses, [reference_answer(r) for r in self.records])
            if metrics is not None:
                metrics["eval_samples_exact_match"] = score
            # Trainer logged the eval metrics just before calling us: complete that log entry.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["eval_samples_exact_match"] = score
        if not state.is_world_process_zero:
            return
        lines = [f"step {state.global_step}: {len(samples)} sample generations"
                 + (f", exact match {score:.3f}" if score is not None else "")]
        for r, s in zip(self.records, samples):
            lines.append(f"  {request_text(r)} → {s['response']!r} (expected {s['expected']!r})")
        logger.info("\n".join(lines))
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(args.output_dir, "eval_generations.jsonl"), "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)


class BaselineExactMatchCallback(TrainerCallback):
    """Exact match before the first update, measured when training starts: by then the model is in place on every
    process (FSDP and ZeRO-3 load it onto one process or in shards, and shard it when training starts).
    `measure(model) -> score` must run on every process. The score is logged at step 0, so a resumed run, which
    starts from a later step and does not measure again, finds it in the checkpoint's trainer state."""

    def __init__(self, measure):
        self.measure = measure

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and model is not None:
            state.log_history.append({"baseline_exact_match": self.measure(model), "step": 0})

    @staticmethod
    def logged(state) -> float | None:
        return next((h["baseline_exact_match"] for h in state.log_history if "baseline_exact_match" in h), None)
