"""Supervised instruction fine-tuning, top to bottom: `sft-hf train` and `accelerate launch recipes/train.py`.

    accelerate launch recipes/train.py                                  # the offline default recipe
    accelerate launch recipes/train.py --config recipes/gpt2-medium-alpaca.yaml --learning_rate 1e-4
    sft-hf train --config my-recipe.yaml                                # the same, from any install

Every value comes from the YAML recipe and any flag overrides it (sft_hf/run/config.py). Without --config: the built-in
default recipe (sft_hf/builtin/default.yaml), unless the command line names a model or dataset (then
TrainingArguments' / TRL's defaults, like `trl sft`).
"""
import json
import logging
import os
import sys
from pathlib import Path

import torch
import transformers
from transformers import set_seed

from sft_hf.callbacks import BaselineExactMatchCallback, GenerationSamplesCallback
from sft_hf.collator import recipe_collator
from sft_hf.errors import Interrupted, RecipeError, install_secret_redaction
from sft_hf.evaluation.generation import generate_responses, request_text
from sft_hf.evaluation.metrics import exact_match
from sft_hf.lora import prepare_training_args
from sft_hf.modeling import load_model, load_tokenizer
from sft_hf.precision import settle_precision
from sft_hf.run import hub, peers
from sft_hf.run.checkpoints import (
    RECIPE_FILE, check_resume_recipe, interrupted_training_message, resolve_resume_checkpoint)
from sft_hf.run.config import format_recipe, parse_recipe_and_values, save_recipe
from sft_hf.run.outputs import logged_train_loss, plot_loss_curve, save_template
from sft_hf.run.preemption import StopOnSignal
from sft_hf.run.training_data import prepare_training_data, source_results, track_data
from sft_hf.run.safety import RUN_RESULTS, StopOnNonFiniteLoss, StopOnSkippedSteps, atomic_save, check_output_dir
from sft_hf.speed import allocator
from sft_hf.speed.threads import set_cpu_threads
from sft_hf.templates import get_template, reference_answer
from sft_hf.trainer import InstructionTrainer

logger = logging.getLogger("sft_hf")


def measure_exact_match(model, tokenizer, records, template, args, label):
    # Every process generates its share: under FSDP / ZeRO-3 each forward pass needs all of them.
    responses = generate_responses(model, tokenizer, records, template, args.max_new_tokens,
                                   batch_size=args.generation_batch_size, show_progress=args.process_index == 0,
                                   distributed=args.world_size > 1)
    score = exact_match(responses, [reference_answer(r) for r in records])
    if args.process_index == 0:
        print(f"\n{label} exact match on {len(records)} held-out instructions: {score:.3f}")
        for record, response in list(zip(records, responses))[: args.num_sample_generations]:
            print(f"  {request_text(record)} → {response!r} (expected {reference_answer(record)!r})")
    return score, responses


def main(argv=None):
    # torchrun (accelerate's multi-process launcher) never tells processes to use the CPU: without a GPU each would
    # silently train alone as world size 1. With this they join one gloo group (accelerate_configs/cpu_2proc.yaml).
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    model_args, data_args, args, recipe = parse_recipe_and_values(argv)
    prepare_training_args(model_args, args)  # LoRA: DDP without the unused-parameter search; sharded checkpointing
    stop_on_signal = StopOnSignal()  # SIGTERM / SIGUSR1: a complete checkpoint at the end of the step, exit 143
    # The Hub push runs once at the end (sft_hf/run/hub.py), not from Trainer at start-up and at every checkpoint; the
    # token is kept out of `args`, which Trainer pickles into training_args.bin.
    push_to_hub, hub_token = args.push_to_hub, args.hub_token
    args.push_to_hub, args.hub_token = False, None
    if push_to_hub and not args.hub_model_id:
        raise RecipeError("push_to_hub needs hub_model_id (user/name)")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    install_secret_redaction()  # tokens / API keys from the environment never reach a log line
    # every core unless the user chose (accelerate launch would give 1), also for a CPU run on a GPU machine
    set_cpu_threads(args.cpu_threads, args.precision_plan.device == "cpu")
    if args.process_index == 0:
        logger.info("malloc: %s (SFT_HF_ALLOCATOR=system keeps glibc's; sft_hf/speed/allocator.py says why)",
                    allocator.active_allocator())
    if args.process_index == 0:
        logger.info("recipe: %s", format_recipe(recipe))
    check_output_dir(args, is_main=args.process_index == 0)  # before any work: a second run must not clobber the first
    peers.apply_ddp_timeout(args)  # on CPUs too (transformers passes it to GPU process groups only)
    peers.watch_peers(args)  # a process that dies ends the run within dead_rank_timeout, naming it
    # `true` / `latest` → the newest checkpoint in output_dir that was completely written
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume:  # with the values it was trained with, else a mix of old optimizer state and new schedule
        check_resume_recipe(resume, recipe)
    set_seed(args.seed)

    # 1. Data: load, split (or mix), template, tokenize and pack, or open the stream (sft_hf/run/training_data.py).
    tokenizer = load_tokenizer(model_args)
    template = get_template(data_args.template)
    data = prepare_training_data(data_args, args, tokenizer, template, resume)
    raw = data.raw
    if data.is_chat and not args.completion_only_loss:
        logger.warning("chat data with completion_only_loss false: user, system and tool turns are trained too; "
                       "set completion_only_loss: true to train only the assistant replies")
    held_out = raw["test"] if len(raw["test"]) else raw["validation"]

    # 2. Model, and the precision it trains in (a LoRA model cannot keep fp32 master weights).
    model = load_model(model_args, tokenizer, args)
    settle_precision(args, model)

    # 3. Train; exact match before the first update (what "learned" is measured against) when training starts.
    # padding-free rows when the attention keeps examples apart (sdpa_varlen by default, flash-attention), else padded
    collator = recipe_collator(tokenizer, args, model)
    args.padding_free = collator.padding_free  # what was used, for the saved arguments and the model card
    trainer = InstructionTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=tokenizer,
        data_collator=collator,
        # stop at a NaN/inf gradient before it is applied, and an fp16 run whose every step overflows
        # and a SIGTERM / SIGUSR1 that asks for a checkpoint at the end of the step
        callbacks=[StopOnNonFiniteLoss(), StopOnSkippedSteps(), stop_on_signal],
        recipe=recipe,  # saved in each checkpoint, for check_resume_recipe
    )
    track_data(data, trainer)  # per-source counts and the stream position, saved with every checkpoint
    if args.eval_exact_match and args.baseline_exact_match:
        trainer.add_callback(BaselineExactMatchCallback(lambda model: measure_exact_match(
            model, tokenizer, held_out.to_list(), template, args, "Before training:")[0]))
    if getattr(args, "eval_generation_samples", 0) and len(raw["validation"]):  # show what the model writes
        samples = raw["validation"].select(range(min(args.eval_generation_samples, len(raw["validation"]))))
        trainer.add_callback(GenerationSamplesCallback(samples.to_list(), template, args.max_new_tokens,
                                                       check_answers=args.eval_exact_match,
                                                       batch_size=args.generation_batch_size))
    if push_to_hub and (reason := hub.cannot_push_reason(hub_token)):
        logger.warning("push_to_hub: %s; training anyway, the push at the end will fail", reason)
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what is kept and how to go on, not a traceback
        for callback in trainer.callback_handler.callbacks:  # the progress bar ends above that line, not below it
            for bar in (getattr(callback, "training_bar", None), getattr(callback, "prediction_bar", None)):
                if bar is not None:
                    bar.close()
        raise Interrupted(interrupted_training_message(args.output_dir, trainer.state)) from None
    stop_on_signal.raise_if_stopped(trainer)  # a SIGTERM stopped training at a saved checkpoint: the run ends there

    # 4. Save the model in standard HF format first: an evaluation that fails or is interrupted loses no training.
    if trainer.is_fsdp_enabled:  # sharded checkpoints while training, one full state dict `from_pretrained` reads
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    # Written beside output_dir and moved in once complete: an interrupted save never looks like a whole model.
    with atomic_save(args.output_dir, enabled=trainer.is_world_process_zero()) as save_dir:
        trainer.save_model(save_dir)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(save_dir)
            save_template(template, save_dir)
            save_recipe(recipe, Path(save_dir, RECIPE_FILE))  # re-run with --config <output_dir>/recipe.yaml
    if trainer.is_world_process_zero():  # a replaced run's card and metrics described its model, not this one
        for name in RUN_RESULTS:
            Path(args.output_dir, name).unlink(missing_ok=True)
    stop_on_signal.restore()  # the model is saved: a SIGTERM during the evaluation stops at once

    # 5. Validation loss and exact match after training (on every process), then metrics, loss curve and card.
    metrics = {}
    if (baseline := BaselineExactMatchCallback.logged(trainer.state)) is not None:
        metrics["baseline_exact_match"] = baseline
    metrics.update(train_result.metrics)
    if resume:  # Trainer's train_loss covers only the steps after the resume (0.0 when none were left)
        metrics["train_loss"] = logged_train_loss(trainer.state.log_history)
    metrics["train_trained_tokens"] = trainer.trained_tokens_total
    if (sources := source_results(data, trainer)) is not None:  # records and tokens of each source
        metrics["sources"] = sources
    try:
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
        if args.eval_exact_match:
            metrics["eval_exact_match"], responses = measure_exact_match(
                trainer.model, tokenizer, held_out.to_list(), template, args, "After training:")
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after training: the trained model is saved in {args.output_dir}, without "
                          "this run's evaluation, metrics and model card") from None
    if args.eval_exact_match and args.process_index == 0:
        records = [{**r, "model_response": resp} for r, resp in zip(held_out.to_list(), responses)]
        Path(args.output_dir, "test_responses.json").write_text(json.dumps(records, indent=2) + "\n")
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", metrics)
        trainer.save_state()
        plot_loss_curve(trainer.state.log_history, str(Path(args.output_dir, "loss_curve.png")))
        hub.build_model_card(args.output_dir, None, model_args, data_args, args, template, metrics, recipe).save(
            Path(args.output_dir, "README.md"))
        print(f"\nSaved model, tokenizer, template, model card and loss curve to {args.output_dir}")
        print(json.dumps({k: v for k, v in metrics.items() if "exact_match" in k or "loss" in k}, indent=2))
    # Every process leaves the process group together: a gloo process that exits without destroying it can abort
    # at interpreter teardown ("terminate called without an active exception", pytorch/pytorch#190489).
    peers.leave_process_group(trainer.accelerator)  # and without hanging in it (sft_hf/run/peers.py)
    if push_to_hub and trainer.is_world_process_zero():
        card = hub.build_model_card(args.output_dir, args.hub_model_id, model_args, data_args, args, template, metrics,
                                    recipe)
        try:
            url = hub.push_to_hub(args.output_dir, args.hub_model_id, card, args.hub_private_repo, hub_token)
        except hub.HubPushError as error:
            logger.error("%s", error)
            sys.exit(1)
        print(f"Pushed to {url}")
