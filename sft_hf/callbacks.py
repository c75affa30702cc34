"""A training callback that shows what the model writes: at each evaluation it greedily answers a few held-out
prompts and logs them (and their exact match, when the dataset's answers are checkable by string equality)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from sft_hf.generation import exact_match, generate_responses

logger = logging.getLogger(__name__)


class GenerationSamplesCallback(TrainerCallback):
    """Adds `eval_samples_exact_match` to the evaluation metrics (when `check_answers`) and appends every sample to
    `<output_dir>/eval_generations.jsonl` as {step, instruction, input, expected, response}."""

    def __init__(self, records: list[dict], template="alpaca", max_new_tokens: int = 64, check_answers: bool = False,
                 batch_size: int = 8, tokenizer=None):
        self.records, self.template, self.max_new_tokens = list(records), template, max_new_tokens
        self.check_answers, self.batch_size, self.tokenizer = check_answers, batch_size, tokenizer
        self.history: list[dict] = []  # what was generated at each evaluation, for tests and notebooks

    def on_evaluate(self, args, state, control, model=None, processing_class=None, metrics=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        if not self.records or model is None or tokenizer is None:
            return
        if args.fsdp or args.deepspeed:  # sharded weights: a generate on some ranks only would hang the others
            logger.warning("GenerationSamplesCallback skipped: no generation during FSDP/DeepSpeed training")
            return
        responses = generate_responses(model, tokenizer, self.records, self.template, self.max_new_tokens,
                                       batch_size=self.batch_size, show_progress=False,
                                       distributed=args.world_size > 1)
        samples = [{"step": state.global_step, "instruction": r.get("instruction"), "input": r.get("input"),
                    "expected": r.get("output"), "response": resp} for r, resp in zip(self.records, responses)]
        self.history.append({"step": state.global_step, "samples": samples})
        score = None
        if self.check_answers:
            score = exact_match(responses, [r["output"] for r in self.records])
            if metrics is not None:
                metrics["eval_samples_exact_match"] = score
            # Trainer logged the eval metrics just before calling us: complete that log entry.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["eval_samples_exact_match"] = score
        if not state.is_world_process_zero:
            return
        lines = [f"step {state.global_step}: {len(samples)} sample generations"
                 + (f", exact match {score:.3f}" if score is not None else "")]
        for s in samples:
            lines.append(f"  {s['instruction']} {s['input']!r} → {s['response']!r} (expected {s['expected']!r})")
        logger.info("\n".join(lines))
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(args.output_dir, "eval_generations.jsonl"), "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
