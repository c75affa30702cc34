"""What a run leaves behind besides the weights: the template and a loss-curve PNG (the model card: sft_hf/run/hub.py)."""
from __future__ import annotations

import json
from pathlib import Path

from sft_hf.templates import TEMPLATES, Template, get_template

TEMPLATE_FILE = "sft_template.json"


def save_template(template: Template, output_dir: str) -> None:
    Path(output_dir, TEMPLATE_FILE).write_text(json.dumps(template.to_dict(), indent=2) + "\n")


def load_template(model_dir: str | None, name: str | None = None) -> Template:
    """The template to prompt a model with: `name` if given, else the one it was trained with (its
    sft_template.json, a built-in one by name when it is unchanged), else alpaca."""
    if name:
        return get_template(name)
    saved = Path(model_dir or "", TEMPLATE_FILE)
    if model_dir and saved.is_file():
        spec = json.loads(saved.read_text())
        builtin = TEMPLATES.get(spec.get("name"))
        return builtin if builtin is not None and builtin.to_dict() == spec else get_template(spec)
    return get_template("alpaca")


def logged_train_loss(log_history: list[dict]) -> float | None:
    """The run's mean training loss from its logged windows (each the mean over the steps since the previous log),
    weighted by their steps: for a resumed run, whose Trainer figure covers only the steps after the resume."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else None


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
