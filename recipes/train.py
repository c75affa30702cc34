"""Supervised instruction fine-tuning, top to bottom.

    accelerate launch recipes/train.py                                  # the offline default recipe
    accelerate launch recipes/train.py --config recipes/gpt2-medium-alpaca.yaml --learning_rate 1e-4

Every value comes from the YAML recipe (recipes/default.yaml when --config is not given) and any flag overrides it.
"""
import json
import logging
import sys
from pathlib import Path

import transformers
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from sft_hf import (  # noqa: E402
    InstructionDataCollator,
    InstructionTrainer,
    exact_match,
    generate_responses,
    get_template,
    load_instruction_dataset,
    load_model,
    load_tokenizer,
    parse_recipe,
    tokenize_dataset,
)
from sft_hf.outputs import plot_loss_curve, save_template, write_model_card  # noqa: E402

logger = logging.getLogger("sft_hf")


def measure_exact_match(model, tokenizer, records, template, args, label):
    responses = generate_responses(model, tokenizer, records, template, args.max_new_tokens,
                                   batch_size=args.per_device_eval_batch_size)
    score = exact_match(responses, [r["output"] for r in records])
    print(f"\n{label} exact match on {len(records)} held-out instructions: {score:.3f}")
    for record, response in list(zip(records, responses))[: args.num_sample_generations]:
        print(f"  {record['instruction']} {record['input']!r} → {response!r} (expected {record['output']!r})")
    return score, responses


def main(argv=None):
    model_args, data_args, args = parse_recipe(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(args.seed)

    # 1. Data: load, split, template, tokenize (the main process first, the others reuse its datasets cache).
    tokenizer = load_tokenizer(model_args)
    template = get_template(data_args.template)
    raw = load_instruction_dataset(
        data_args.dataset_name, data_args.dataset_config, data_args.column_mapping,
        data_args.train_split_ratio, data_args.test_split_ratio, data_args.shuffle_seed,
    )
    if data_args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    if data_args.max_eval_samples:
        for split in ("validation", "test"):
            raw[split] = raw[split].select(range(min(data_args.max_eval_samples, len(raw[split]))))
    with args.main_process_first(desc="tokenize"):
        tokenized = tokenize_dataset(raw, tokenizer, template, args.max_length, data_args.dataset_num_proc,
                                     verbose=args.process_index == 0)
    held_out = raw["test"] if len(raw["test"]) else raw["validation"]

    # 2. Model, and its exact match before training (what "learned" is measured against).
    model = load_model(model_args, tokenizer, args)
    metrics = {}
    if args.eval_exact_match and args.process_index == 0:
        metrics["baseline_exact_match"], _ = measure_exact_match(
            model, tokenizer, held_out.to_list(), template, args, "Before training:")

    # 3. Train.
    collator = InstructionDataCollator(
        pad_token_id=tokenizer.pad_token_id,
        completion_only_loss=args.completion_only_loss,
        max_length=args.max_length,
        pad_to_multiple_of=args.pad_to_multiple_of,
        padding_free=args.padding_free or args.packing,
    )
    trainer = InstructionTrainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"] if len(tokenized["validation"]) else None,
        processing_class=tokenizer,
        data_collator=collator,
    )
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics.update(train_result.metrics)
    metrics["train_trained_tokens"] = trainer.trained_tokens_total
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())

    # 4. Exact match after training, then save everything in standard HF format.
    if args.eval_exact_match and args.process_index == 0:
        metrics["eval_exact_match"], responses = measure_exact_match(
            trainer.model, tokenizer, held_out.to_list(), template, args, "After training:")
        records = [{**r, "model_response": resp} for r, resp in zip(held_out.to_list(), responses)]
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output_dir, "test_responses.json").write_text(json.dumps(records, indent=2) + "\n")
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        save_template(template, args.output_dir)
        trainer.save_metrics("all", metrics)
        trainer.save_state()
        plot_loss_curve(trainer.state.log_history, str(Path(args.output_dir, "loss_curve.png")))
        write_model_card(args.output_dir, model_args, data_args, args, template, metrics)
        print(f"\nSaved model, tokenizer, template, model card and loss curve to {args.output_dir}")
        print(json.dumps({k: v for k, v in metrics.items() if "exact_match" in k or "loss" in k}, indent=2))
    if args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
