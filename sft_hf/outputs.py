"""What a run leaves behind besides the weights: the template, a loss-curve PNG and a model card."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from sft_hf.templates import Template

TEMPLATE_FILE = "sft_template.json"


def save_template(template: Template, output_dir: str) -> None:
    Path(output_dir, TEMPLATE_FILE).write_text(json.dumps(template.to_dict(), indent=2) + "\n")


def plot_loss_curve(log_history: list[dict], path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per trained token")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CARD_HYPERPARAMETERS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "max_length",
    "completion_only_loss", "padding_free",
)


def write_model_card(output_dir: str, model_args, data_args, train_args, template: Template, metrics: dict) -> str:
    base = model_args.model_name_or_path
    meta = {
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["sft-hf", "instruction-tuning", "sft"] + (["lora", "peft"] if model_args.use_peft else []),
    }
    if not base.startswith("builtin:") and not Path(base).exists():
        meta["base_model"] = base
    if not data_args.dataset_name.startswith("builtin:") and not Path(data_args.dataset_name).exists():
        meta["datasets"] = [data_args.dataset_name]
    hyper = {k: getattr(train_args, k) for k in CARD_HYPERPARAMETERS}
    results = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    card = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        f"# {Path(output_dir).name}",
        "",
        f"Instruction-tuned from `{base}` on `{data_args.dataset_name}` with [sft-hf](https://pypi.org/project/sft-hf/).",
        "",
        f"## Prompt template: `{template.name}`",
        "",
        "```",
        template.format_prompt({"instruction": "{instruction}", "input": "{input}"}) + "{output}<eos>",
        "```",
        "(the `input` part only when the input is non-empty; saved as `sft_template.json`)",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        f'generate = pipeline("text-generation", model="{output_dir}")',
        "```",
        "",
        "## Training hyperparameters",
        "",
        "| name | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in hyper.items()],
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4g} |" for k, v in results.items()],
        "",
    ]
    path = Path(output_dir, "README.md")
    path.write_text("\n".join(card))
    return str(path)
