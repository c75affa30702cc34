"""The generation callback inside a real (tiny) training run."""
import json

from sft_hf.callbacks import GenerationSamplesCallback
from sft_hf.evaluation.generation import generate_responses
from sft_hf.evaluation.metrics import exact_match
from sft_hf.builtin.toy import make_toy_records

from eval_helpers import _chatty_model_dir  # noqa: F401  (fixture chatty_model_dir: a model whose answers differ)


def test_generates_logs_and_scores_at_each_evaluation(tmp_path, chatty_model_dir):
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_hf import InstructionDataCollator, InstructionTrainer, SFTArguments, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir)
    records = make_toy_records(40, seed=3)
    raw = DatasetDict(train=Dataset.from_list(records[:32]), validation=Dataset.from_list(records[32:]))
    tokenized = tokenize_dataset(raw, tokenizer, "alpaca", max_length=128, verbose=False)
    samples = records[32:35]
    args = SFTArguments(output_dir=str(tmp_path), max_steps=4, eval_strategy="steps", eval_steps=2,
                        per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-3,
                        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                        precision="fp32")  # on any CPU: with bf16 weights the final fp32 model may answer otherwise
    callback = GenerationSamplesCallback(samples, "alpaca", max_new_tokens=6, check_answers=True)
    trainer = InstructionTrainer(model=model, args=args, train_dataset=tokenized["train"],
                                 eval_dataset=tokenized["validation"], processing_class=tokenizer,
                                 data_collator=InstructionDataCollator(pad_token_id=tokenizer.pad_token_id),
                                 callbacks=[callback])
    trainer.train()

    assert [h["step"] for h in callback.history] == [2, 4]
    # What was generated at the last evaluation is what the trained model generates now (same weights).
    final = generate_responses(trainer.model, tokenizer, samples, "alpaca", 6, show_progress=False)
    assert [s["response"] for s in callback.history[-1]["samples"]] == final
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    for entry, history in zip(evals, callback.history):
        responses = [s["response"] for s in history["samples"]]
        assert entry["eval_samples_exact_match"] == exact_match(responses, [r["output"] for r in samples])
    lines = [json.loads(line) for line in (tmp_path / "eval_generations.jsonl").read_text().splitlines()]
    assert [(line["step"], line["expected"]) for line in lines] == [(s, r["output"]) for s in (2, 4) for r in samples]
    assert lines[-1]["response"] == final[-1]
    assert len({line["response"] for line in lines}) > 1


def test_exact_match_counts_the_checkable_answers(tmp_path, chatty_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir)
    records = make_toy_records(3, seed=5)
    written = generate_responses(model, tokenizer, records, "alpaca", 6, show_progress=False)
    # Two of three references are exactly what the model writes (one with extra spaces), the third is not.
    assert all(written)
    records = [{**records[0], "output": written[0]}, {**records[1], "output": f"  {written[1]} "},
               {**records[2], "output": written[2] + " x"}]
    callback = GenerationSamplesCallback(records, "alpaca", max_new_tokens=6, check_answers=True)
    state = TrainerState(global_step=7)
    state.log_history.append({"eval_loss": 1.0, "step": 7})
    metrics = {"eval_loss": 1.0}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    callback.on_evaluate(args, state, TrainerControl(), model=model, processing_class=tokenizer, metrics=metrics)
    assert metrics["eval_samples_exact_match"] == 2 / 3
    assert state.log_history[-1] == {"eval_loss": 1.0, "step": 7, "eval_samples_exact_match": 2 / 3}
